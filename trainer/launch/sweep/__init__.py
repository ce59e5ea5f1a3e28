"""Sweeps (no torch): a sweep file (`spec.py`) expands into points, each an ordinary job directory; the sweep's own
state is `sweeps/<name>/sweep.json` (`state.py`); `run.py` validates, submits, retries and cancels them through an
executor; `results.py` summarizes and plots; `cli.py` is `sweep.py`."""
