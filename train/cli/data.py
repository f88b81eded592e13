"""moe-data: prepare a corpus once (tokenized, sharded, memory-mappable) for moe-train and moe-eval."""

from __future__ import annotations

import argparse
import sys

from train.cli.common import run_guarded


def data_main(argv=None) -> int:
    """moe-data prepare --input=PATH --output=DIR [--tokenizer=byte|bpe|FILE] [...]: a summary on stdout;
    moe-data verify --data=DIR: every shard read and checked against index.json."""
    prog = "moe-data"
    p = argparse.ArgumentParser(prog=prog, description="Prepare data: tokenize a corpus once into memory-mapped shards.")
    commands = p.add_subparsers(dest="command", required=True, metavar="{prepare,verify}")
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
    q.add_argument("--allow_binary", action="store_true",
                   help="tokenize files that look binary (a NUL byte in the first 8000 bytes, or over 30%% not UTF-8)")
    q.add_argument("--verbose", action="store_true", help="show tracebacks")
    v = commands.add_parser(
        "verify", help="read every shard of a prepared folder and check it against index.json",
        description="Check every shard's size, SHA-256, token ids (all inside the vocabulary) and histogram "
                    "against index.json: exit 0, or one line per bad shard and exit 2.")
    v.add_argument("--data", required=True, help="the prepared folder")
    v.add_argument("--verbose", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return run_guarded(prog, args.verbose, lambda: (_verify if args.command == "verify" else _prepare)(args))


def _verify(args) -> int:
    import json

    from train.data.prepared import open_prepared

    prepared = open_prepared(args.data, f"--data={args.data}")
    problems = prepared.problems(full=True)
    for line in problems:
        print(f"moe-data: {line}", file=sys.stderr, flush=True)
    if problems:
        return 2
    shards = sum(len(v["shards"]) for v in prepared.index["splits"].values())
    print(json.dumps({"data": args.data, "shards": shards, "ok": True}), flush=True)
    return 0


def _prepare(args) -> int:
    import json

    from train.data.prepare import SHARD_TOKENS, PrepareOptions, default_workers, prepare

    opts = PrepareOptions(
        input=args.input, output=args.output, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
        validation_fraction=args.validation_fraction, max_bytes=args.max_bytes,
        workers=default_workers() if args.workers is None else args.workers,
        shard_tokens=SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens, allow_binary=args.allow_binary,
    )
    index = prepare(opts)
    splits = index["splits"]
    summary = {"output": args.output, "dtype": index["dtype"], "tokenizer": index["tokenizer"]["kind"],
               "vocab_size": index["tokenizer"]["vocab_size"],
               **{f"{s}_tokens": v["tokens"] for s, v in splits.items()},
               **{f"{s}_shards": len(v["shards"]) for s, v in splits.items()},
               "validation_share": splits["validation"]["share"],
               "replaced_chars": sum(v["replaced_chars"] for v in splits.values())}
    print(f"train on it: moe-train --config=configs/default.py --workdir=DIR --config.data.path={args.output}",
          file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0
