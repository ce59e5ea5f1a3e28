#!/usr/bin/env bash
# The README demo: build the demo corpus (once), train the demo job on this machine (or resume it), export it
# as a Hugging Face model, evaluate it with lm-eval offline, and let transformers generate a sample.
# PYTHON: the interpreter Anvil is installed into (default: `python`, e.g. of the activated virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import torch, lm_eval, trainer.launch.submit' 2>/dev/null; then
    echo "demo.sh: '$PYTHON' ($(command -v "$PYTHON" || echo "not found")) cannot import torch, lm-eval and Anvil;" \
        "install them (python -m pip install torch==2.13.0 -e '.[dev]') or name the python you installed them into:" \
        "PYTHON=/path/to/venv/bin/python scripts/demo.sh" >&2
    exit 2
fi
[ -f data/demo/tokenizer.json ] || "$PYTHON" -m trainer.data demo data/demo
"$PYTHON" submit.py configs/demo.yaml --executor local "$@"  # here, now: the export below needs it finished
rm -rf hf/demo  # the previous demo export: regenerated below from the newest checkpoint
"$PYTHON" convert.py jobs/demo hf/demo --eval --sample "def main("
