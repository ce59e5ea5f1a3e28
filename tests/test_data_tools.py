"""Data tools (convert, tokenizer, demo corpus, inspect) and the loader's bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from tests.conftest import REPO_ROOT
from tests.data_helpers import write_corpus, write_tokenizer
from trainer.data import tools
from trainer.data.__main__ import main as data_main
from trainer.data.sources import DataError


def test_convert_jsonl_and_text_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}", "meta": i}) for i in range(5)) + "\n\n")
    (tmp_path / "b.txt").write_text("a whole file is one document\nwith two lines")
    assert data_main(["convert", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "out"),
                      "--row-group-rows", "2"]) == 0
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.column("text").to_pylist() == [f"doc {i}" for i in range(5)] + [
        "a whole file is one document\nwith two lines"]
    assert table.column("id").to_pylist() == list(range(6))
    assert pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").num_row_groups == 3


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "ok"}\n{not json\n', "a.jsonl:2: not JSON"),
    ('{"body": "x"}\n', "a.jsonl:1: expected an object with a string 'text'"),
])
def test_convert_bad_jsonl(tmp_path: Path, capsys, content: str, message: str) -> None:
    (tmp_path / "a.jsonl").write_text(content)
    assert data_main(["convert", str(tmp_path / "a.jsonl"), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_train_tokenizer_and_inspect(tmp_path: Path, capsys) -> None:
    texts = [f"def function_{i}(x):\n    return x * {i} + len('anvil')\n" for i in range(400)]
    tools.write_parquet(texts, tmp_path / "code", row_group_rows=50)
    assert data_main(["tokenizer", str(tmp_path / "code"), str(tmp_path / "tok.json"), "--vocab-size", "300"]) == 0
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok.json"))
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id("<|endoftext|>") == 0
    text = "def function_7(x): ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: nothing is unknown
    info = tools.inspect(str(tmp_path / "code"), tokenizer=str(tmp_path / "tok.json"))
    assert info["rows"] == 400 and info["row_groups"] == 8 and info["estimated_tokens"] > 400 * 10
    assert data_main(["inspect", str(tmp_path / "code")]) == 0
    assert "400 rows in 8 row groups" in capsys.readouterr().out


def test_demo_corpus_from_this_machine(tmp_path: Path) -> None:
    summary = tools.build_demo(tmp_path / "demo", max_mb=1.5, vocab_size=1024)
    assert summary["train_docs"] > 50 and summary["val_docs"] >= 10
    assert (tmp_path / "demo" / "tokenizer.json").is_file()
    train = pq.read_table(tmp_path / "demo" / "train").column("text").to_pylist()
    val = pq.read_table(tmp_path / "demo" / "val").column("text").to_pylist()
    assert not set(train) & set(val), "validation text is held out"


def test_inspect_names_a_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no Parquet file"):
        tools.inspect(str(tmp_path / "nothing"))


def test_memory_stays_bounded_over_a_large_corpus(tmp_path: Path) -> None:
    """Peak RSS after streaming a corpus ~200× the shuffle window is close to that after the first batches."""
    tokenizer = write_tokenizer(tmp_path / "tok.json", 40_000)
    write_corpus(tmp_path / "big", range(40_000), row_group_rows=500, files=4, mean_words=300)  # ~24 MB of text
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from tests.data_helpers import data_config
        from trainer.data.loader import build_loader
        from pathlib import Path
        cfg = data_config([(Path({str(tmp_path / 'big')!r}), 1.0)], Path({str(tokenizer)!r}), seq_len=512,
                          shuffle_window=200, num_workers=0, epochs=1)
        # VmHWM: this process's own peak (ru_maxrss would start at the forking pytest process's peak)
        rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
        it = iter(build_loader(cfg, 0, 0, 1, 8))
        for _ in range(20):
            next(it)
        early = rss()
        tokens = sum(b["input_ids"].numel() for b in it)
        print(early, rss(), tokens)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    early, late, tokens = (float(x) for x in out.stdout.split())
    assert tokens > 5_000_000  # the whole corpus went through
    assert early > 100 and late - early < 64, f"peak RSS grew from {early:.0f} MB to {late:.0f} MB while streaming"
