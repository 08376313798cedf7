#!/usr/bin/env bash
# Install memckpt with NeMo-Run into its own venv, run examples/nemo_run_launch.py (2 local
# processes through NeMo-Run's LocalExecutor) and tests/recipes/test_nemo_run.py.
#
# nemo-run 0.11.1 pulls about 90 packages and resolves only with leptonai 0.27.3 pinned,
# so it stays out of the dev venv and CI. Usage, from anywhere:
#
#   scripts/test_nemo_run.sh                 # venv in /tmp/memckpt-nemorun-venv (reused)
#   NEMORUN_VENV=/path/to/venv scripts/test_nemo_run.sh
#
# Exit status 0 only when the example printed OK and every test passed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMORUN_VENV:-/tmp/memckpt-nemorun-venv}"
python="${PYTHON:-python3}"
work="$(mktemp -d /tmp/memckpt-nemorun-XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if [[ ! -x "$venv/bin/python" ]]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
fi
echo "== installing memckpt[nemo-run] (torch 2.13.0 kept) into $venv"
"$venv/bin/pip" install --quiet torch==2.13.0 -e "$repo[nemo-run]" "pytest>=8" "pytest-timeout>=2.3"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print("   " + ", ".join(f"{p} {md.version(p)}" for p in
      ("nemo_run", "leptonai", "torch", "hydra-core", "omegaconf", "memckpt")))
EOF
installed=$(date +%s)

echo "== examples/nemo_run_launch.py (2 ranks, killed by the fault plugin, then resumed)"
set +e
(cd "$work" && NEMORUN_HOME="$work/nemo_home" "$venv/bin/python" "$repo/examples/nemo_run_launch.py" \
    --run-dir "$work/example") > "$work/example.log" 2>&1
example_rc=$?
set -e
sed -n '/^{$/,$p' "$work/example.log"
if [[ $example_rc -ne 0 ]]; then
    echo "example failed (exit $example_rc); its last lines:"
    tail -n 60 "$work/example.log"
fi
example_done=$(date +%s)

echo "== tests/recipes/test_nemo_run.py"
set +e
(cd "$repo" && NEMORUN_HOME="$work/nemo_home" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/recipes/test_nemo_run.py)
tests_rc=$?
set -e
end=$(date +%s)

echo "== install $((installed - start))s, example $((example_done - installed))s (exit $example_rc)," \
     "tests $((end - example_done))s (exit $tests_rc), total $((end - start))s"
[[ $example_rc -eq 0 && $tests_rc -eq 0 ]]
