"""Every example in README.md and docs/*.md runs as written.

Each fenced ``python``, ``bash``/``sh``/``shell`` and ``console`` block is one pytest item,
named ``PAGE:LINE`` (the line of its opening fence). Python blocks run in a fresh
interpreter, shell blocks through ``bash`` with ``set -eo pipefail``, console blocks their
``$ `` lines (the rest is output). The blocks of one page run in page order, in one
scratch directory of that page, as a reader following the page would: an item first
runs (once) what comes before it on its page, so ``-k`` picks any block alone.

What the markdown says about a block, in HTML comments right before its fence (several
may stack; rendered pages do not show them)::

    <!-- docs-test: skip (needs a GPU) -->   not run: a pytest skip with that reason
    <!-- docs-test: output -->              a transcript or a table, not commands
    <!-- docs-test: torchrun 2 -->          python -m torch.distributed.run --standalone
                                            --nproc-per-node 2 (gloo on the CPU)
    <!-- docs-test: continues -->           the previous python block's program goes on
    <!-- docs-test: runs 2 -->              run the program twice: a restart resumes
    <!-- docs-test: timeout 90 -->          seconds (default 60; torchrun and shell 120)
    <!-- docs-test: file run.yaml -->       any language: written to run.yaml in the page's
                                            scratch directory before its blocks run
    <!-- docs-test: setup
    ...code...                              run first: what the prose says the reader
    -->                                     already has (a model, a process group)

A python block and the ``continues`` blocks after it are one program, run once in one
process (under torchrun when the first block says so) when its first item runs; each
segment runs with ``exec`` of code compiled under the page's name with its real line
numbers, so a traceback points into the markdown. The item of the segment that raised
fails; later ones are skipped as not reached.

Isolation: ``/dev/shm`` and ``/nfs`` in a block are the page's own directories under
``/dev/shm`` and the scratch directory, ``MEMCKPT_*`` variables are unset but for
``MEMCKPT_BASE_DIR`` (the page's ``/dev/shm`` directory, where defaults would write),
``PATH`` starts with this interpreter's directory, and the checkout's top-level entries
(``examples``, ``benchmarks``, ``src``, ...) are linked into the scratch directory so
paths relative to the checkout work. Everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_LANGS = frozenset({"python", "py"})
SHELL_LANGS = frozenset({"bash", "sh", "shell"})
CONSOLE_LANGS = frozenset({"console"})
RUN_LANGS = PYTHON_LANGS | SHELL_LANGS | CONSOLE_LANGS
DEFAULT_TIMEOUT_S = 60.0
LONG_TIMEOUT_S = 120.0
# linked into each scratch directory, so paths relative to the checkout work
CHECKOUT_ENTRIES = ("README.md", "pyproject.toml", "src", "examples", "benchmarks", "scripts",
                    "tests", "docs", ".venv")  # fmt: skip
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->", re.DOTALL)
_SEGMENT_FAILED = "docs-test: segment {} failed"
_SEGMENT_FAILED_RE = re.compile(r"docs-test: segment (\d+) failed")


@dataclass
class Block:
    """One fenced block of a page and what its markers say."""

    page: str  # relative to the checkout: "README.md", "docs/guide.md"
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    first_code_line: int  # 1-based line of the block's first line of code
    skip: str | None = None
    output: bool = False
    torchrun: int | None = None
    continues: bool = False
    timeout_s: float | None = None
    runs: int = 1
    file: str | None = None
    setup: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def executable(self) -> bool:
        return self.lang in RUN_LANGS and self.file is None


def parse_markers(text: str, block: Block) -> None:
    """Apply the ``docs-test:`` comments in ``text`` (the lines before a fence) to ``block``."""
    for m in _MARKER.finditer(text):
        body = m.group(1)
        head, _, rest = body.strip().partition("\n")
        if head.strip() == "setup":
            block.setup += textwrap.dedent(rest).strip("\n") + "\n"
            continue
        for directive in _directives(body):
            word, _, arg = directive.partition(" ")
            arg = arg.strip()
            if word == "skip":
                reason = arg[1:-1] if arg.startswith("(") and arg.endswith(")") else arg
                if not reason:
                    block.errors.append("docs-test: skip needs a reason: skip (why)")
                block.skip = reason or "no reason given"
            elif word == "output" and not arg:
                block.output = True
            elif word == "continues" and not arg:
                block.continues = True
            elif word == "torchrun" and arg.isdigit() and int(arg) > 0:
                block.torchrun = int(arg)
            elif word == "runs" and arg.isdigit() and int(arg) > 0:
                block.runs = int(arg)
            elif word == "timeout" and re.fullmatch(r"\d+(\.\d+)?", arg):
                block.timeout_s = float(arg)
            elif word == "file" and arg and "/" not in arg:
                block.file = arg
            else:
                block.errors.append(f"unknown docs-test directive {directive!r}")


def _directives(body: str) -> Iterator[str]:
    """``a; b (x; y); c`` -> ``a``, ``b (x; y)``, ``c``: a parenthesized reason may hold ``;``."""
    depth, current = 0, []
    for ch in body:
        if ch == ";" and depth == 0:
            yield "".join(current).strip()
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        current.append(ch)
    if "".join(current).strip():
        yield "".join(current).strip()


def extract_blocks(page: str, text: str) -> list[Block]:
    """The fenced blocks of a page with their markers (a comment block right before a fence)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        block = Block(page, start + 1, lang, "\n".join(body) + "\n", start + 2)
        parse_markers(_comments_before(lines, start), block)
        blocks.append(block)
    return blocks


def _comments_before(lines: list[str], fence: int) -> str:
    """The HTML comments that end right before line ``fence`` (blank lines allowed)."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return ""
    end = j
    while j >= 0:
        if "<!--" in lines[j]:
            k = j - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and lines[k].rstrip().endswith("-->"):
                j = k
                continue
            break
        j -= 1
    return "\n".join(lines[max(j, 0) : end + 1])


def console_commands(code: str) -> str:
    """The commands of a console transcript: ``$ `` lines and their ``\\`` continuations."""
    out: list[str] = []
    continuing = False
    for line in code.splitlines():
        if continuing:
            out.append(line)
            continuing = line.rstrip().endswith("\\")
        elif line.startswith("$ "):
            out.append(line[2:])
            continuing = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def collect() -> tuple[list[Block], dict[str, list[Block]]]:
    """Every block that runs or is marked, and each page's ``file`` blocks."""
    items: list[Block] = []
    files: dict[str, list[Block]] = {}
    for path in _pages():
        page = path.relative_to(ROOT).as_posix()
        previous_python: Block | None = None
        for block in extract_blocks(page, path.read_text(encoding="utf-8")):
            if block.file is not None:
                files.setdefault(page, []).append(block)
                continue
            if block.continues and (previous_python is None or block.lang not in PYTHON_LANGS):
                block.errors.append("'continues' needs a python block before it on the page")
            if block.lang in PYTHON_LANGS and not block.output:
                previous_python = block
            if block.lang in RUN_LANGS or block.skip or block.output or block.errors:
                items.append(block)
    return items, files


BLOCKS, FILES = collect()


def _chains(blocks: list[Block]) -> dict[str, list[Block]]:
    """Each python block's program: the chain of blocks it belongs to, by block id."""
    chains: dict[str, list[Block]] = {}
    current: list[Block] = []
    for b in blocks:
        if b.lang not in PYTHON_LANGS or b.output:
            continue
        if not b.continues or not current:
            current = []
        current.append(b)
        chains[b.id] = current
    return chains


CHAINS = _chains(BLOCKS)


# -- running ------------------------------------------------------------------------------


@dataclass
class Scratch:
    """One page's working directory and its stand-ins for /dev/shm and /nfs."""

    cwd: Path
    shm: Path

    def localize(self, code: str) -> str:
        code = re.sub(r"/dev/shm(?![\w.-])", str(self.shm), code)
        return re.sub(r"(?<![\w.])/nfs(?![\w.-])", str(self.cwd / "nfs"), code)


@dataclass
class ChainResult:
    failed_segment: int | None  # None: every segment ran
    output: str
    skip_reason: str | None = None


class Runner:
    """Runs blocks in their pages' scratch directories; each program and script once."""

    def __init__(self) -> None:
        self._scratch: dict[str, Scratch] = {}
        self._results: dict[str, ChainResult] = {}
        self._shell_results: dict[str, tuple[int, str]] = {}

    def scratch(self, page: str) -> Scratch:
        if page not in self._scratch:
            shm_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            cwd = Path(tempfile.mkdtemp(prefix="memckpt-docs-"))
            shm = Path(tempfile.mkdtemp(prefix="memckpt-docs-", dir=shm_root))
            for name in CHECKOUT_ENTRIES:
                if (ROOT / name).exists():
                    (cwd / name).symlink_to(ROOT / name)
            (cwd / "nfs").mkdir()
            s = Scratch(cwd, shm)
            for f in FILES.get(page, []):
                assert f.file is not None
                (cwd / f.file).write_text(s.localize(f.code))
            self._scratch[page] = s
        return self._scratch[page]

    def close(self) -> None:
        for s in self._scratch.values():
            shutil.rmtree(s.cwd, ignore_errors=True)
            shutil.rmtree(s.shm, ignore_errors=True)

    def run_chain(self, chain: list[Block]) -> ChainResult:
        key = chain[0].id
        if key not in self._results:
            self._results[key] = self._run_python(chain)
        return self._results[key]

    def _run_python(self, chain: list[Block]) -> ChainResult:
        first = chain[0]
        if first.skip is not None:
            return ChainResult(None, "", skip_reason=f"{first.id} is skipped: {first.skip}")
        s = self.scratch(first.page)
        segments: list[tuple[str, int, str]] = []  # (code, first line, filename)
        for b in chain:
            if b.setup:
                segments.append((s.localize(b.setup), 1, f"<setup of {b.id}>"))
            segments.append((s.localize(b.code), b.first_code_line, b.page))
        owners = [_owner(chain, i) for i in range(len(segments))]
        program = _python_program(segments)
        script = s.cwd / f"_docs_test_{first.page.replace('/', '_')}_{first.line}.py"
        script.write_text(program)
        if first.torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(first.torchrun), script.name]  # fmt: skip
        else:
            cmd = [sys.executable, script.name]
        timeout = max(b.timeout_s or 0.0 for b in chain) or (
            LONG_TIMEOUT_S if first.torchrun else DEFAULT_TIMEOUT_S
        )
        outputs: list[str] = []
        for run in range(max(b.runs for b in chain)):
            rc, out = _run(cmd, s, timeout)
            outputs.append(f"--- run {run + 1} ---\n{out}")
            if rc != 0:
                failed = [int(m) for m in _SEGMENT_FAILED_RE.findall(out)]
                segment = owners[min(failed)] if failed else len(chain) - 1
                return ChainResult(segment, f"exit status {rc}\n" + "\n".join(outputs))
        return ChainResult(None, "\n".join(outputs))

    def run_shell(self, block: Block) -> tuple[int, str]:
        if block.id not in self._shell_results:
            s = self.scratch(block.page)
            code = console_commands(block.code) if block.lang in CONSOLE_LANGS else block.code
            script = "set -eo pipefail\n" + s.localize(block.setup) + s.localize(code)
            path = s.cwd / f"_docs_test_{block.page.replace('/', '_')}_{block.line}.sh"
            path.write_text(script)
            timeout = block.timeout_s or LONG_TIMEOUT_S
            self._shell_results[block.id] = _run(["bash", path.name], s, timeout)
        return self._shell_results[block.id]

    def run_earlier(self, block: Block) -> None:
        """Run what comes before ``block`` on its page, as a reader would (results kept)."""
        for b in BLOCKS:
            if b is block:
                return
            if b.page != block.page or b.skip is not None or b.output or b.errors:
                continue
            if b.lang in PYTHON_LANGS:
                self.run_chain(CHAINS[b.id])
            elif b.lang in SHELL_LANGS | CONSOLE_LANGS:
                self.run_shell(b)


def _owner(chain: list[Block], segment: int) -> int:
    """Which block of the chain a segment (setups included) belongs to."""
    i = 0
    for k, b in enumerate(chain):
        i += 2 if b.setup else 1
        if segment < i:
            return k
    return len(chain) - 1


def _python_program(segments: list[tuple[str, int, str]]) -> str:
    """A script that runs each segment in turn and names the one that raised."""
    codes = [("\n" * (line - 1)) + code for code, line, _ in segments]
    names = [name for _, _, name in segments]
    failed = _SEGMENT_FAILED.format("{}")
    return (
        "import builtins as _docs_test_builtins\nimport sys as _docs_test_sys\n\n"
        f"_docs_test_segments = {codes!r}\n"
        f"_docs_test_names = {names!r}\n\n"
        'if __name__ == "__main__":\n'
        "    for _docs_test_i, _docs_test_code in enumerate(_docs_test_segments):\n"
        "        try:\n"
        "            _docs_test_builtins.exec(_docs_test_builtins.compile(\n"
        '                _docs_test_code, _docs_test_names[_docs_test_i], "exec"))\n'
        "        except BaseException:\n"
        f"            _docs_test_sys.stderr.write({failed!r}.format(_docs_test_i) + '\\n')\n"
        "            _docs_test_sys.stderr.flush()\n"
        "            raise\n"
    )


def _env(scratch: Scratch) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCKPT_")}
    env["MEMCKPT_BASE_DIR"] = str(scratch.shm / "memckpt")  # where defaults would write
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):  # fmt: skip
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], scratch: Scratch, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own session; (exit status, stdout and stderr). Kills it on timeout."""
    proc = subprocess.Popen(
        cmd, cwd=scratch.cwd, env=_env(scratch), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, f"timed out after {timeout:g}s\n" + out.decode(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing the block started outlives it
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner()
    try:
        yield r
    finally:
        r.close()


def _param(block: Block) -> object:
    marks: list[pytest.MarkDecorator] = []
    if block.errors:
        pass
    elif block.skip is not None:
        marks.append(pytest.mark.skip(reason=f"{block.skip} [{block.id}]"))
    elif block.output:
        marks.append(pytest.mark.skip(reason=f"output, not commands [{block.id}]"))
    elif block.torchrun or block.lang not in PYTHON_LANGS:
        marks.append(pytest.mark.slow)
    return pytest.param(block, id=block.id, marks=marks)


def _tail(text: str, n: int = 12000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_docs_example_runs(block: Block, runner: Runner) -> None:
    assert not block.errors, f"{block.id}: " + "; ".join(block.errors)
    runner.run_earlier(block)
    if block.lang in PYTHON_LANGS:
        chain = CHAINS[block.id]
        result = runner.run_chain(chain)
        if result.skip_reason is not None:
            pytest.skip(result.skip_reason)
        position = chain.index(block)
        if result.failed_segment is None or position < result.failed_segment:
            return
        if position > result.failed_segment:
            pytest.skip(f"not reached: {chain[result.failed_segment].id} failed")
        pytest.fail(f"{block.id} failed:\n{block.code}\n--- output ---\n{_tail(result.output)}")
    elif block.lang in SHELL_LANGS | CONSOLE_LANGS:
        rc, out = runner.run_shell(block)
        assert rc == 0, f"{block.id} exited {rc}:\n{block.code}\n--- output ---\n{_tail(out)}"
    else:
        pytest.fail(f"{block.id}: a {block.lang or 'plain'} block cannot run; mark it output")


# -- the extractor itself -----------------------------------------------------------------

SAMPLE = """\
# Page

<!-- docs-test: skip (needs a GPU; or two) -->
```python
import torch; torch.cuda.init()
```

<!-- docs-test: torchrun 2 -->
<!-- docs-test: setup
x = 1
-->
```python
y = x + 1
```

<!-- docs-test: continues; timeout 30; runs 2 -->

```python
assert y == 2
```

```console
$ memckpt ls /dev/shm/ckpt \\
    --json
{"jobs": []}
```

<!-- docs-test: file run.yaml -->
```yaml
a: 1
```
"""


def test_markers_before_a_fence_describe_its_block() -> None:
    skip, first, second, console, yaml = extract_blocks("p.md", SAMPLE)
    assert (skip.line, skip.skip, skip.first_code_line) == (4, "needs a GPU; or two", 5)
    assert (first.torchrun, first.setup, first.code) == (2, "x = 1\n", "y = x + 1\n")
    assert (second.continues, second.timeout_s, second.runs, second.torchrun) == (
        True,
        30.0,
        2,
        None,
    )
    assert console.skip is None and console.lang == "console"
    assert console_commands(console.code) == "memckpt ls /dev/shm/ckpt \\\n    --json\n"
    assert (yaml.file, yaml.executable) == ("run.yaml", False)
    assert not any(b.errors for b in (skip, first, second, console, yaml))
    assert [b.id for b in _chains([first, second])["p.md:18"]] == ["p.md:12", "p.md:18"]


def test_an_unknown_directive_is_an_error_of_its_block() -> None:
    (block,) = extract_blocks("p.md", "<!-- docs-test: skipp (typo) -->\n```bash\ntrue\n```\n")
    assert block.errors == ["unknown docs-test directive 'skipp (typo)'"]


def test_paths_under_dev_shm_and_nfs_go_to_the_pages_own_directories(tmp_path: Path) -> None:
    s = Scratch(tmp_path / "cwd", tmp_path / "shm")
    code = 'M("/dev/shm/ckpt", "j"); export(x, "/nfs/ckpt/step-100")  # /dev/shm is a tmpfs'
    assert s.localize(code) == (
        f'M("{tmp_path}/shm/ckpt", "j"); export(x, "{tmp_path}/cwd/nfs/ckpt/step-100")'
        f"  # {tmp_path}/shm is a tmpfs"
    )
