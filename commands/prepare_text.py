"""``lte-prepare-text``: text files, .jsonl / .parquet records or a saved Hugging Face dataset turned
into token files (``train.bin``, ``val.bin``, ``meta.json``) for ``--dataset text``; the tokenizers and
the token files are ``lte.common.data.text``'s."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from lte.common.data.text import (
    BYTES_ID,
    DEFAULT_BPE_VOCAB,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    is_record_source,
    iter_records,
    read_text_inputs,
    stream_token_files,
    write_token_files,
)
from lte.common.job.checks import OneLineArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lte-prepare-text",
        description="Turn text files into token files (train.bin, val.bin, meta.json) for --dataset text.",
        epilog='example: bible -f "Genesis 1:1-Revelation 22:21" > kjv.txt && lte-prepare-text kjv.txt --out data/kjv',
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="UTF-8 text files ('-' reads standard input), or records streamed from .jsonl / .parquet "
        "files and Hugging Face datasets.save_to_disk folders (their --text-column)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--tokenizer",
        default=BYTES_ID,
        help="'bytes' (vocabulary 256, the default), 'bpe' (train a byte-level BPE on the inputs), "
        "or the path of a Hugging Face tokenizer.json",
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_BPE_VOCAB, help="BPE vocabulary [4096]")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="last fraction held out [0.1]")
    parser.add_argument(
        "--text-column", default="text", help="the text field of .jsonl / .parquet / dataset records [text]"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        streamed = any(is_record_source(p) for p in args.inputs)
        texts = [] if streamed else read_text_inputs(args.inputs)
        if args.tokenizer == BYTES_ID:
            tokenizer: Tokenizer = ByteTokenizer()
        elif args.tokenizer == "bpe":
            if args.vocab_size < 257:
                raise ValueError(f"--vocab-size must be > 256 for BPE, got {args.vocab_size}")
            corpus: Iterable[str] = texts
            if streamed:  # one streamed pass to train on, another to encode
                corpus = (
                    t
                    for p in args.inputs
                    for t in (
                        iter_records(p, args.text_column) if is_record_source(p) else read_text_inputs([p])
                    )
                )
            tokenizer = BPETokenizer.train(corpus, args.vocab_size)
        elif Path(args.tokenizer).is_file():
            tokenizer = BPETokenizer.from_file(args.tokenizer)
        else:
            raise ValueError(
                f"--tokenizer {args.tokenizer!r}: neither 'bytes', 'bpe' nor a tokenizer.json file"
            )
        if streamed:
            meta = stream_token_files(
                args.out, args.inputs, tokenizer, column=args.text_column, val_fraction=args.val_fraction
            )
        else:
            meta = write_token_files(args.out, texts, tokenizer, val_fraction=args.val_fraction)
    except ImportError as exc:
        print(f"lte-prepare-text: error: BPE needs Hugging Face tokenizers ({exc})", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"lte-prepare-text: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens, "
        f"vocabulary {meta['vocab_size']} ({meta['tokenizer']}), {meta['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
