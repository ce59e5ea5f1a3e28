"""Serving an export with a well-kept server: `transformers serve` on localhost answers a completion request with
the greedy continuation `convert.py --sample` prints (the README's command, on a small trained model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.train_helpers import free_port, make_job, run_trainer
from trainer.export.cli import SAMPLE_TOKENS
from trainer.export.cli import main as convert

PROMPT = "def main("


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_transformers_serve_answers_with_the_exports_greedy_tokens(tmp_path: Path, corpus: Path, capsys) -> None:
    job = make_job(tmp_path, "served", corpus, "train.steps=10")
    assert run_trainer(job).returncode == 0
    export = tmp_path / "hf"
    assert convert([str(job), str(export), "--sample", PROMPT]) == 0
    printed = capsys.readouterr().out
    head = f"sample (greedy, {SAMPLE_TOKENS} tokens): "
    expected = next(line for line in printed.splitlines() if line.startswith(head))[len(head):]

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(export), "--port",
                               str(port), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the server did not come up within 120 s"
                time.sleep(0.5)
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": str(export), "prompt": PROMPT, "max_tokens": SAMPLE_TOKENS, "temperature": 0})
        assert answer["usage"]["completion_tokens"] == SAMPLE_TOKENS
        assert PROMPT + answer["choices"][0]["text"] == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
