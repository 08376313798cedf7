#!/usr/bin/env bash
# Everything memckpt does on a GPU, in one run: the CUDA tests, the CUDA staging benchmarks,
# and a single-GPU recipe run with NCCL that stops and resumes. See docs/gpu_check.md.
#
#   bash scripts/gpu_check.sh            # writes $OUT/gpu_check.md (OUT: ./gpu_check_out)
#
# Installs nothing from the network. On a machine without a GPU it says so in one line and
# runs what it can (the CUDA tests are collected and skip; the recipe runs with gloo), so
# the day it runs on a GPU the only unknowns are the GPU's. Budget: about 8 minutes with a
# GPU, 3 without. Exit code: 0 when every check that ran passed, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
SIZE_MIB=${GPU_CHECK_SIZE_MIB:-256}  # per benchmark state; small, so it fits the budget
LOG="$OUT/gpu_check.log"
REPORT="$OUT/gpu_check.md"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/memckpt-gpu-check.XXXXXX")
SHM=$(mktemp -d /dev/shm/memckpt-gpu-check.XXXXXX 2>/dev/null || mktemp -d "$WORK/shm.XXXXXX")
trap 'rm -rf "$WORK" "$SHM"' EXIT
export PYTHONPATH="$ROOT/src:$ROOT/tests:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
cd "$ROOT" || exit 1
: >"$LOG"
ROWS=()
FAILED=0
START=$(date +%s)

note() { echo "$*" | tee -a "$LOG"; }

# row CHECK RESULT SECONDS DETAIL
row() { ROWS+=("| $1 | $2 | $3 | ${4//|//} |"); note "[$2] $1 (${3}s) $4"; }

# run CHECK LIMIT_S CMD...: the command's output goes to the log (and to $WORK/last.out)
run() {
    local name=$1 limit=$2 t0 rc secs
    shift 2
    note ""
    note "== $name: $*"
    t0=$(date +%s%N)
    timeout --kill-after=15 "$limit" "$@" >"$WORK/last.out" 2>&1
    rc=$?
    secs=$(( ($(date +%s%N) - t0 + 500000000) / 1000000000 ))
    cat "$WORK/last.out" >>"$LOG"
    LAST_RC=$rc
    LAST_SECS=$secs
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        LAST_NOTE="timed out after ${limit}s"
    else
        LAST_NOTE=""
    fi
    return $rc
}

pytest_summary() {  # the last "N passed, M skipped ..." line of the last run
    grep -E '(passed|failed|skipped|error|deselected|no tests ran)' "$WORK/last.out" | tail -1 \
        | sed -E 's/=+//g; s/^ +| +$//g'
}

# test modules this machine cannot import (an adapter's framework it lacks): they are
# left out, and named, rather than stopping the run
uncollected() {
    local n
    n=$(grep -cE '^ERROR (collecting )?tests/' "$WORK/last.out")
    [[ $n -gt 0 ]] && echo "; $n test modules not importable here: $(grep -oE '^ERROR (collecting )?tests/[^ :]+' "$WORK/last.out" | sed -E 's/^ERROR (collecting )?//' | sort -u | head -5 | tr '\n' ' ')"
}

# -- the machine ---------------------------------------------------------------------------
GPU_INFO=$("$PYTHON" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {torch.cuda.device_count()} {p.name} ({p.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"none torch {torch.__version__}")
EOF
)
if [[ -z "$GPU_INFO" ]]; then
    note "gpu_check: $PYTHON cannot import torch; nothing to check"
    exit 1
fi
PYVER=$("$PYTHON" -c 'import platform; print(platform.python_version())')
if [[ $GPU_INFO == gpu* ]]; then
    HAVE_GPU=1
    NGPU=$(echo "$GPU_INFO" | cut -d' ' -f2)
    MACHINE=$(echo "$GPU_INFO" | cut -d' ' -f3-)
    note "gpu_check: GPU: $MACHINE, Python $PYVER"
else
    HAVE_GPU=0
    NGPU=0
    MACHINE="no GPU, ${GPU_INFO#none }"
    note "gpu_check: no GPU (torch.cuda.is_available() is False): the CUDA checks report 'no GPU'; running the rest"
fi

# -- what the recipes need beyond torch: omegaconf and hydra-core, from local wheels ---------
if ! "$PYTHON" -c 'import omegaconf, hydra, yaml' >/dev/null 2>&1; then
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "$ROOT"/.whl/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
fi
if "$PYTHON" -c 'import omegaconf, hydra, yaml' >/dev/null 2>&1; then HAVE_RECIPE_DEPS=1; else HAVE_RECIPE_DEPS=0; fi

# -- the fused hash + NaN/Inf kernel (memckpt.storage._scan): built in place for this
# interpreter when a C compiler and setuptools are there; without it the numpy check runs
if ! "$PYTHON" -c 'import memckpt.storage._scan' >/dev/null 2>&1; then
    (cd "$ROOT" && timeout 120 "$PYTHON" setup.py -q build_ext --inplace) >>"$LOG" 2>&1 || true
fi
SCAN_LEVEL=$("$PYTHON" -c 'from memckpt.storage.scan import native_level as n; print({None: "not built (numpy check)", 0: "portable C", 2: "AVX2", 3: "AVX-512"}[n()])' 2>>"$LOG")
note "gpu_check: fused scan kernel: ${SCAN_LEVEL:-unknown}"

# -- 1. the CUDA tests are collected ----------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider --continue-on-collection-errors)
run "collect -m cuda" 120 "${PYTEST[@]}" -m cuda --collect-only -q
n=$(grep -cE '^tests/.*::' "$WORK/last.out")
if [[ $n -gt 0 ]]; then
    row "CUDA tests collected (\`pytest -m cuda --collect-only\`)" pass "$LAST_SECS" "$n tests$(uncollected)"
else
    row "CUDA tests collected (\`pytest -m cuda --collect-only\`)" FAIL "$LAST_SECS" "none collected (exit $LAST_RC $LAST_NOTE)$(uncollected)"
    FAILED=1
fi

# -- 2. the CUDA tests ------------------------------------------------------------------------
run "pytest -m cuda" 300 "${PYTEST[@]}" -m cuda -q -rs --timeout 240
summary="$(pytest_summary) $LAST_NOTE$(uncollected)"
if [[ -n $LAST_NOTE ]] || grep -qE '[0-9]+ failed' "$WORK/last.out" \
        || ! grep -qE '[0-9]+ (passed|skipped)' "$WORK/last.out"; then
    row "CUDA tests (\`pytest -m cuda\`)" FAIL "$LAST_SECS" "$summary"
    FAILED=1
elif [[ $HAVE_GPU -eq 0 ]]; then
    row "CUDA tests (\`pytest -m cuda\`)" "no GPU" "$LAST_SECS" "$summary"
else
    row "CUDA tests (\`pytest -m cuda\`)" pass "$LAST_SECS" "$summary"
fi

# -- 3. DCP staging on the CPU: both executors, with this machine's torch ----------------------
if run "pytest test_dcp_staging" 240 "$PYTHON" -m pytest -p no:cacheprovider -q -m "not cuda" \
        --timeout 200 tests/test_dcp_staging.py; then
    row "DCP async_save staging, CPU (\`tests/test_dcp_staging.py\`)" pass "$LAST_SECS" "$(pytest_summary)"
else
    row "DCP async_save staging, CPU (\`tests/test_dcp_staging.py\`)" FAIL "$LAST_SECS" "$(pytest_summary) $LAST_NOTE"
    FAILED=1
fi

# -- 4. benchmarks --------------------------------------------------------------------------
BENCH_MD=""
bench() {  # bench CHECK LIMIT CMD...: the printed table goes into the report
    local name=$1
    if run "$@"; then
        row "$name" pass "$LAST_SECS" "table below"
        BENCH_MD+=$'\n'"### $name"$'\n\n```\n'"$(grep -vE 'Warning|warn\(|pynvml' "$WORK/last.out" | sed '/^$/d' | tail -40)"$'\n```\n'
    else
        row "$name" FAIL "$LAST_SECS" "exit $LAST_RC $LAST_NOTE: $(tail -1 "$WORK/last.out")"
        FAILED=1
    fi
}
if [[ $HAVE_GPU -eq 1 ]]; then
    bench "\`benchmarks/save_load.py --device cuda\` ($SIZE_MIB MiB)" 180 "$PYTHON" \
        benchmarks/save_load.py --device cuda --size-mib "$SIZE_MIB" --repeats 3 --dir "$SHM"
    bench "\`benchmarks/dcp.py --device cuda\` ($SIZE_MIB MiB)" 180 "$PYTHON" \
        benchmarks/dcp.py --device cuda --size-mib "$SIZE_MIB" --repeats 3 --dir "$SHM"
else
    row "\`benchmarks/save_load.py --device cuda\`" "no GPU" 0 "not run"
    row "\`benchmarks/dcp.py --device cuda\`" "no GPU" 0 "not run"
fi
bench "\`benchmarks/dcp.py --async-only\`, CPU, 1 rank (64 MiB)" 150 "$PYTHON" \
    benchmarks/dcp.py --async-only --worlds 1 --size-mib 64 --repeats 3 --dir "$SHM"

# -- 5. a recipe run that stops, then resumes from memory -----------------------------------------
if [[ $HAVE_RECIPE_DEPS -eq 0 ]]; then
    row "recipe run and resume" FAIL 0 "omegaconf/hydra-core missing: put their wheels in .whl/ (docs/gpu_check.md)"
    FAILED=1
else
    if [[ $HAVE_GPU -eq 1 ]]; then BACKEND=nccl; else BACKEND=gloo; fi
    recipe=(-m memckpt run gpt_tiny "dist.backend=$BACKEND" train.steps=40 checkpoint.memory.interval=5
            "checkpoint.memory.base_dir=$SHM/recipe" "checkpoint.persistent.dir=$WORK/persistent"
            checkpoint.persistent.interval=10 checkpoint.job_id=gpu-check train.progress=false
            --run-dir "$WORK/run" --json)
    label="\`memckpt run gpt_tiny dist.backend=$BACKEND\`, stop at 20 then resume"
    [[ $HAVE_GPU -eq 0 ]] && label+=" (no GPU: gloo on the CPU)"
    t_all=$(date +%s)
    if run "recipe: stop at 20" 240 "$PYTHON" "${recipe[@]}" train.stop_after=20 \
            && run "recipe: resume" 240 "$PYTHON" "${recipe[@]}"; then
        verdict=$("$PYTHON" - "$WORK/last.out" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
r = doc.get("resumed_from") or {}
ok = doc.get("ok") and doc.get("completed") and r.get("tier") == "memory" and r.get("step") == 20
print(("ok " if ok else "bad ") + f"resumed from {r.get('tier')} step {r.get('step')}, "
      f"final step {doc.get('final_step')}, loss {doc.get('final_loss', 0):.3f}")
EOF
)
        secs=$(( $(date +%s) - t_all ))
        if [[ $verdict == ok* ]]; then
            row "$label" pass "$secs" "${verdict#ok }"
        else
            row "$label" FAIL "$secs" "${verdict#bad }"
            FAILED=1
        fi
    else
        row "$label" FAIL "$LAST_SECS" "exit $LAST_RC $LAST_NOTE: $(grep -v '^\[rank' "$WORK/last.out" | tail -1)"
        FAILED=1
    fi
fi
if [[ $NGPU -ge 2 ]]; then
    bench "\`memckpt demo --device cuda\` (2 GPUs)" 240 "$PYTHON" -m memckpt demo --device cuda \
        --steps 30 --interval 5 --out "$WORK/demo"
else
    row "\`memckpt demo --device cuda\`" "not run" 0 "needs 2 GPUs (this machine: $NGPU)"
fi

# -- the report ----------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
    echo "# memckpt GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), $MACHINE, Python $PYVER, fused scan kernel: ${SCAN_LEVEL:-unknown}, ${TOTAL} s in all."
    [[ $HAVE_GPU -eq 0 ]] && echo && echo "**No GPU**: the CUDA rows say so; nothing here is a GPU figure."
    echo
    echo "| check | result | seconds | detail |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "The whole output is in \`gpu_check.log\` beside this file."
    [[ -n "$BENCH_MD" ]] && echo && echo "## Benchmark tables" && echo "$BENCH_MD"
} >"$REPORT"
note ""
note "gpu_check: $([[ $FAILED -eq 0 ]] && echo "all checks that ran passed" || echo "FAILED"); report: $REPORT (${TOTAL}s)"
exit $FAILED
