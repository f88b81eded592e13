"""moe-data: prepare a corpus once (tokenized, sharded, memory-mappable) for moe-train and moe-eval."""

from __future__ import annotations

import argparse
import sys

from train.cli.common import run_guarded


def data_main(argv=None) -> int:
    """moe-data prepare --input=PATH --output=DIR [--tokenizer=byte|bpe|FILE] [...]: a summary on stdout."""
    prog = "moe-data"
    p = argparse.ArgumentParser(prog=prog, description="Prepare data: tokenize a corpus once into memory-mapped shards.")
    commands = p.add_subparsers(dest="command", required=True, metavar="prepare")
    q = commands.add_parser(
        "prepare", help="tokenize --input into --output (resumable: rerun the same command after an interruption)",
        description="Tokenize a corpus once, in parallel, into token shards, index.json and the tokenizer; then "
                    "train with --config.data.path=OUTPUT. Rerunning the same command resumes an interrupted one.")
    q.add_argument("--input", required=True, help="a text or .jsonl file, a folder, or a glob pattern (as data.path)")
    q.add_argument("--output", required=True, help="the folder to write (written as OUTPUT.partial, renamed when done)")
    q.add_argument("--tokenizer", default="byte",
                   help="byte (default), bpe (trained here on the train split), or a tokenizer.json / SentencePiece .model file")
    q.add_argument("--bpe_vocab_size", type=int, default=2048, help="ids of the BPE --tokenizer=bpe trains (default 2048)")
    q.add_argument("--validation_fraction", type=float, default=0.05, help="share held out for validation (default 0.05)")
    q.add_argument("--max_bytes", type=int, default=0, help="read at most this many bytes of text (default 0 = all)")
    q.add_argument("--workers", type=int, default=None, help="tokenizing processes (default min(CPUs, 8))")
    q.add_argument("--shard_tokens", type=int, default=None, help="tokens per shard file (default 67108864)")
    q.add_argument("--verbose", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return run_guarded(prog, args.verbose, lambda: _prepare(args))


def _prepare(args) -> int:
    import json

    from train.data.prepare import SHARD_TOKENS, PrepareOptions, default_workers, prepare

    opts = PrepareOptions(
        input=args.input, output=args.output, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
        validation_fraction=args.validation_fraction, max_bytes=args.max_bytes,
        workers=default_workers() if args.workers is None else args.workers,
        shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
    )
    index = prepare(opts)
    splits = index["splits"]
    summary = {"output": args.output, "dtype": index["dtype"], "tokenizer": index["tokenizer"]["kind"],
               "vocab_size": index["tokenizer"]["vocab_size"],
               **{f"{s}_tokens": v["tokens"] for s, v in splits.items()},
               **{f"{s}_shards": len(v["shards"]) for s, v in splits.items()}}
    print(f"train on it: moe-train --config=configs/default.py --workdir=DIR --config.data.path={args.output}",
          file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0
