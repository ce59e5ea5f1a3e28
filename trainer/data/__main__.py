"""`python -m trainer.data {convert,tokenizer,demo,inspect}`: the data tools (see trainer/data/tools.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trainer.core.errors import run_command
from trainer.data import tools


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="jsonl (one object per line) or text files (one document each) -> Parquet")
    convert.add_argument("inputs", nargs="+", type=Path)
    convert.add_argument("out", type=Path, help="output directory")
    convert.add_argument("--text-field", default="text", help="JSON field holding the text")
    convert.add_argument("--rows-per-file", type=int, default=20_000)
    convert.add_argument("--row-group-rows", type=int, default=512,
                         help="rows per row group: the unit shared out to data workers")
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a Parquet dataset")
    tok.add_argument("dataset")
    tok.add_argument("out", type=Path, help="tokenizer.json to write")
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--text-column", default="text")
    tok.add_argument("--max-mb", type=float, default=50, help="train on at most this much text")
    demo = sub.add_parser("demo", help="build the demo corpus (train/, val/, tokenizer.json) from this machine's text")
    demo.add_argument("out", type=Path)
    demo.add_argument("--max-mb", type=float, default=8)
    demo.add_argument("--vocab-size", type=int, default=8192)
    ins = sub.add_parser("inspect", help="files, row groups, rows, bytes and estimated tokens of a dataset")
    ins.add_argument("dataset")
    ins.add_argument("--text-column", default="text")
    ins.add_argument("--tokenizer")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    if args.command == "convert":
        files = tools.write_parquet(tools.read_inputs(args.inputs, args.text_field), args.out,
                                    args.rows_per_file, args.row_group_rows)
        console.print(f"wrote {len(files)} file(s) to {args.out}", markup=False)
    elif args.command == "tokenizer":
        texts = tools.iter_texts(args.dataset, args.text_column, int(args.max_mb * 1e6))
        tools.train_tokenizer(texts, args.out, args.vocab_size)
        console.print(f"wrote {args.out}", markup=False)
    elif args.command == "demo":
        summary = tools.build_demo(args.out, args.max_mb, args.vocab_size)
        console.print(f"demo corpus in {args.out}: {summary}", markup=False)
    else:
        info = tools.inspect(args.dataset, args.text_column, args.tokenizer)
        table = Table("file", "rows", "row groups", "MB")
        for f in info["files"]:
            table.add_row(f["file"], str(f["rows"]), str(f["row_groups"]), f"{f['bytes'] / 1e6:.1f}")
        console.print(table)
        extra = f", ~{info['estimated_tokens']:,} tokens" if "estimated_tokens" in info else ""
        console.print(f"{info['rows']:,} rows in {info['row_groups']} row groups, "
                      f"{info['bytes'] / 1e6:.1f} MB{extra}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
