"""What the NaN/Inf check and the admission check cost a save, side by side in one run.

    python benchmarks/guardrails.py [--size-mib 1024] [--tensors 16] [--repeats 7]
    python benchmarks/guardrails.py --kernel [--size-mib 1024] [--repeats 7]

One CheckpointManager on a tmpfs (default /dev/shm), keep_last=2, warm (two untimed
saves first, so the pool holds its pre-faulted buffers). Saves alternate between the
default (every floating tensor checked for NaN/Inf in the background, fused into the
checksum pass by the native kernel), ``check_finite=lambda name: False`` (hashing only),
and, where the kernel is built, the default with the kernel turned off (xxhash, then the
numpy check of each piece in cache: what runs without a compiler). The order rotates
every repeat. For each, the medians of:

- blocking time: ``save()`` returning (the admission check runs here);
- background time: ``total_s - blocking_s``, from ``save()`` returning to the commit
  (checksums, the NaN/Inf check, index, header, vote, manifest, retention).

``--kernel`` times the scan alone instead: one float32 buffer of ``--size-mib`` hashed
in 4 MiB chunks on the copy threads (as a save's background part does), by xxhash
(the baseline), by the native kernel hashing only, and by the kernel hashing and
checking float32 and bfloat16 lanes, at every vector width the CPU has.

Half the tensors are float32 and half bfloat16. Prints medians and the ratios the
project targets: the check adds <= 5 % to the background time and nothing to the
blocking time. A last row times a save whose state holds one NaN (found and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import memckpt
from memckpt.storage import scan


def make_state(size_mib: int, n: int) -> dict[str, torch.Tensor]:
    per = (size_mib << 20) // n
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        out[f"t{i}"] = torch.randn(per // dtype.itemsize).to(dtype)
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    state = make_state(a.size_mib, a.tensors)
    work = Path(tempfile.mkdtemp(prefix="memckpt-bench-guard-", dir=a.dir))
    rows: dict[str, dict[str, list[float]]] = {
        k: {"blocking": [], "background": []}
        for k in ("checked", "unchecked", "checked (numpy)", "one NaN")
    }
    native = scan.native_level()
    try:
        with memckpt.CheckpointManager(work, "bench", keep_last=2) as m:
            step = 0
            for _ in range(2):  # warm: the pool holds pre-faulted buffers afterwards
                step += 1
                m.save(step, state).wait()
            kinds = ["checked", "unchecked"] + (["checked (numpy)"] if native is not None else [])
            for rep in range(a.repeats):
                for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:  # rotated
                    step += 1
                    check = (lambda name: False) if kind == "unchecked" else None
                    scan.use_native(kind != "checked (numpy)")
                    r = m.save(step, state, check_finite=check).wait()
                    assert r.committed and r.step_finite
                    rows[kind]["blocking"].append(r.blocking_s)
                    rows[kind]["background"].append(r.total_s - r.blocking_s)
            scan.use_native(True)
            bad = dict(state)
            bad["t0"] = state["t0"].clone()
            bad["t0"][len(bad["t0"]) // 2] = float("nan")
            for _ in range(max(1, a.repeats // 2)):
                step += 1
                r = m.save(step, bad).wait()
                assert r.committed and not r.step_finite and r.non_finite == ("t0",)
                rows["one NaN"]["blocking"].append(r.blocking_s)
                rows["one NaN"]["background"].append(r.total_s - r.blocking_s)
    finally:
        scan.use_native(True)
        shutil.rmtree(work, ignore_errors=True)
    med = {
        k: {m: statistics.median(v) for m, v in d.items()} for k, d in rows.items() if d["blocking"]
    }
    return {
        "size_mib": a.size_mib,
        "tensors": a.tensors,
        "repeats": a.repeats,
        "threads": torch.get_num_threads(),
        "native_level": native,
        "medians_s": med,
        "background_ratio": med["checked"]["background"] / med["unchecked"]["background"],
        "blocking_ratio": med["checked"]["blocking"] / med["unchecked"]["blocking"],
    }


def kernel(a: argparse.Namespace) -> None:
    """The scan alone: xxhash against the fused kernel, on the copy threads."""
    from concurrent.futures import ThreadPoolExecutor

    import xxhash

    native = scan._native
    if native is None:
        print("the native scan kernel is not built: nothing to compare")
        return
    data = torch.randn((a.size_mib << 20) // 4)
    mv = memoryview(data.numpy()).cast("B")
    chunk = 4 << 20
    starts = range(0, len(mv), chunk)
    threads = max(1, min(4, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(threads)
    fns = {
        "xxhash (baseline)": lambda o: xxhash.xxh3_64_intdigest(mv[o : o + chunk]),
        "kernel, hash only": lambda o: native.scan(mv[o : o + chunk], True, 0, 0, 0),
        "kernel, + float32 check": lambda o: native.scan(
            mv[o : o + chunk], True, 4, 0x7F800000, 0x7F800000
        ),
        "kernel, + bfloat16 check": lambda o: native.scan(
            mv[o : o + chunk], True, 2, 0x7F80, 0x7F80
        ),
    }
    best = native.set_simd(9)
    names = {0: "portable C", 2: "AVX2", 3: "AVX-512"}
    print(f"scan of {a.size_mib} MiB in 4 MiB chunks on {threads} threads, "
          f"median of {a.repeats} (s)")  # fmt: skip
    try:
        for level in sorted({native.set_simd(lv) for lv in (0, 2, 3) if lv <= best}, reverse=True):
            native.set_simd(level)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(a.repeats):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    list(pool.map(fn, starts))
                    times[name].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med["xxhash (baseline)"]
            print(f"-- {names[level]}")
            for name, v in med.items():
                print(f"   {name:<26}{v:>8.4f}  x{v / base:.3f}")
    finally:
        native.set_simd(9)
        pool.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--kernel", action="store_true", help="time the scan kernel alone")
    a = p.parse_args()
    if a.kernel:
        kernel(a)
        return
    out = run(a)
    med = out["medians_s"]
    print(f"memckpt guardrails: {a.size_mib} MiB in {a.tensors} tensors (fp32/bf16), "
          f"{a.repeats} repeats, medians")  # fmt: skip
    print(f"{'save':<12}{'blocking s':>12}{'background s':>14}")
    for kind, v in med.items():
        print(f"{kind:<12}{v['blocking']:>12.4f}{v['background']:>14.4f}")
    level = {None: "not built: numpy", 0: "portable C", 2: "AVX2", 3: "AVX-512"}
    print(f"fused hash+check kernel: {level.get(out['native_level'])}")
    if "checked (numpy)" in med:
        numpy_ratio = med["checked (numpy)"]["background"] / med["unchecked"]["background"]
        print(f"numpy check instead (two passes): background x{numpy_ratio:.3f}")
    print(f"NaN/Inf check: background x{out['background_ratio']:.3f} (target <= 1.05), "
          f"blocking x{out['blocking_ratio']:.3f} (target: no change)")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
