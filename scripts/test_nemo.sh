#!/usr/bin/env bash
# Install NeMo 2.7.3 into a venv of its own and run memckpt's NeMo adapter tests there.
#
#   scripts/test_nemo.sh [VENV_DIR]        (default: /tmp/memckpt-nemo-venv; reused if present)
#
# NeMo pins hydra-core 1.3.2 (memckpt's dev venv has 1.3.8), so it cannot share the dev venv.
# nemo_toolkit[lightning] alone does not install what AutoResume(resume_if_exists=True)
# imports (nemo.utils.exp_manager -> einops, sentencepiece, pandas): they are added here.
# memckpt itself runs from the checkout (PYTHONPATH), so nothing is written into it.
# Besides tests/test_nemo_adapter.py it runs the single-process Lightning adapter tests,
# which there run on NeMo's lightning 2.4 (lightning.pytorch) and pytorch_lightning 2.6.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-/tmp/memckpt-nemo-venv}
python=${PYTHON:-python3}

t0=$(date +%s)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 "nemo_toolkit[lightning]==2.7.3" \
    einops sentencepiece pandas "pytest>=8" "pytest-timeout>=2.3" "xxhash>=3.4" "rich>=13"
t1=$(date +%s)
"$venv/bin/python" -c '
import torch, nemo, lightning
assert torch.__version__.split("+")[0] == "2.13.0", f"torch {torch.__version__}, expected 2.13.0"
print(f"torch {torch.__version__}, nemo {nemo.__version__}, lightning {lightning.__version__}")
'
cd "$repo"
PYTHONPATH="$repo/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/test_nemo_adapter.py tests/test_lightning_adapter.py -m "not slow"
t2=$(date +%s)
echo "test_nemo.sh: install $((t1 - t0)) s, tests $((t2 - t1)) s, venv $(du -sh "$venv" | cut -f1)"
