#!/usr/bin/env bash
# The README demo: build the demo corpus (once), train the demo job on this machine (or resume it), export it
# as a Hugging Face model, evaluate it with lm-eval offline, and let transformers generate a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[ -f data/demo/tokenizer.json ] || "$PYTHON" -m trainer.data demo data/demo
"$PYTHON" submit.py configs/demo.yaml --executor local "$@"  # here, now: the export below needs it finished
rm -rf hf/demo  # the previous demo export: regenerated below from the newest checkpoint
"$PYTHON" convert.py jobs/demo hf/demo --eval --sample "def main("
