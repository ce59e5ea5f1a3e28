"""The export side (torch, one process, any training world size): a DCP step → a Hugging Face folder with muP folded
in (`hf.py`) and back (`hf_import.py`), the model card and Hub upload (`hub.py`), lm-eval on the export
(`evaluation.py`, local tasks in `evals/`), and the `convert.py` command line (`cli.py`)."""
