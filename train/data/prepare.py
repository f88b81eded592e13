"""moe-data prepare: tokenize a corpus once, in parallel, into a prepared folder (``train.data.prepared``).

Shape letters: N tokens.

In order: the options, the input, the tokenizer file and the output folder are checked before
anything is written. Then, under DIR.partial: the tokenizer (a BPE trained on the train split, a
given file copied, or a note for the byte tokenizer); then each split's documents are read in file
order through ``docsplit.document_split`` (by documents, close to the asked fraction) and grouped
into chunks of about ``chunk_chars`` characters, which ``workers`` processes tokenize, in order, at
most two per worker in flight (memory stays flat whatever the corpus size). Each document's tokens
and eos are appended to shards of ``shard_tokens`` tokens (``shards.ShardWriter``), each recorded
with its SHA-256, largest id and histogram of ids.

Before that, ``guards`` refuses binary input files (unless ``allow_binary``) and names those with
undecodable bytes, and locks the output: a second prepare on it is refused, naming the holder.

Resumable: a shard is written as .NAME.tmp and renamed when complete; progress.json then records it
with where the next shard starts in the stream (chunk, offset, and the text counted before that
chunk). A rerun of the same command skips the finished shards (their chunks are read, not
tokenized) and, the output depending on nothing but the input and settings (not on the worker
count), writes the same bytes. At the end index.json is written, progress.json removed and
DIR.partial renamed to DIR: a reader sees a whole folder or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

from train.data.config import TOKENIZERS, DataConfig, fingerprint
from train.data.docsplit import document_split
from train.data.guards import LOCK_FILE, check_inputs, output_lock
from train.data.parallel import CHUNK_CHARS, chunks, encoded, tokenizer_spec
from train.data.prepared import BYTE_NOTE, FORMAT, INDEX, PROGRESS, SPLITS, VERSION, token_dtype, tokenizer_identity
from train.data.shards import ShardWriter as _ShardWriter
from train.data.sources import describe_path, empty_split_error, file_digests, list_files
from train.data.tokenizers import (
    BPETokenizer, ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer_file, train_bpe,
)
from train.errors import DataError

SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB per uint16 shard
BYTE_TEXT = "byte tokenizer: ids 0..255 are the UTF-8 bytes of the text; pad=256, bos=257, eos=258. No file needed.\n"


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


@dataclasses.dataclass
class PrepareOptions:
    input: str
    output: str
    tokenizer: str = "byte"  # byte | bpe | a tokenizer.json or SentencePiece .model file
    bpe_vocab_size: int = 2048
    validation_fraction: float = 0.05
    max_bytes: int = 0
    workers: int = dataclasses.field(default_factory=default_workers)
    shard_tokens: int = SHARD_TOKENS
    chunk_chars: int = CHUNK_CHARS  # part of the settings: resume positions count chunks
    allow_binary: bool = False  # tokenize files that look binary (else refused)

    def data_config(self) -> DataConfig:
        """The ``data.*`` settings that read the same splits from the raw input."""
        return DataConfig(path=self.input, tokenizer="bpe" if self.tokenizer == "bpe" else "byte",
                          bpe_vocab_size=self.bpe_vocab_size, validation_fraction=self.validation_fraction,
                          max_bytes=self.max_bytes)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(opts: PrepareOptions, log: Callable[[str], None] = _stderr, bar: bool | None = None) -> dict:
    """Prepare ``opts.output`` (see the module docstring); returns its index. Bad input -> ``DataError``
    naming the flag, with nothing written; ``bar``: a tqdm bar on stderr (default: on a terminal)."""
    with _flag_names(opts):
        given = _check_options(opts)
        for warning in check_inputs(list_files(opts.input), opts.allow_binary, f"--input={opts.input}"):
            log(f"--input={opts.input}: undecodable bytes become U+FFFD: {warning}")
        settings = _settings(opts, given)
        out = pathlib.Path(opts.output).expanduser()
        partial = out.with_name(out.name + ".partial")
        done = _check_output(out, partial, settings)
        if done is None:
            created = not partial.exists()
            try:
                with output_lock(partial, f"--output={opts.output}"):
                    return _locked(opts, given, settings, out, partial, created, log, bar)
            except OSError as e:  # a full disk, say: what is finished stays, for the rerun to resume
                raise DataError(f"--output={opts.output}: cannot write {e.filename or partial} ({e.strerror or e}); "
                                "fix that and rerun the same command to resume") from e
        log(f"--output={opts.output}: already prepared from this input with these settings; nothing to do")
        return done


def _locked(opts: PrepareOptions, given: Tokenizer | None, settings: dict, out: pathlib.Path,
            partial: pathlib.Path, created: bool, log, bar: bool | None) -> dict:
    """The preparation, while this process holds the output's lock."""
    try:
        done = _check_output(out, partial, settings)  # again: another prepare may have finished meanwhile
        if done is not None:
            if created:
                shutil.rmtree(partial, ignore_errors=True)
            return done
        progress = _start(partial, settings, log)
        tokenizer, file = _tokenizer(opts, partial, given, log)
        dtype = token_dtype(tokenizer.vocab_size)
        spec = tokenizer_spec(tokenizer, dtype)
        for split in SPLITS:
            _write_split(split, opts, spec, (partial, tokenizer.vocab_size), progress, log,
                         sys.stderr.isatty() if bar is None else bar)
        return _finish(opts, out, partial, progress, tokenizer, file, dtype, log)
    except DataError:
        if created:  # nothing half-written: a failed first attempt leaves no folder
            shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def _flag_names(opts: PrepareOptions):
    """``sources`` names ``data.path=...``; here the same problems are about the command's flags."""
    try:
        yield
    except DataError as e:
        message = str(e).replace(describe_path(opts.input), f"--input={opts.input}")
        raise DataError(message.replace("data.validation_fraction", "--validation_fraction")) from None


def _check_options(o: PrepareOptions) -> Tokenizer | None:
    """Every flag checked; returns the tokenizer a ``--tokenizer=FILE`` names (else None)."""
    if not o.input:
        raise DataError("--input: give a file, folder or glob pattern of text or .jsonl files")
    if not o.output:
        raise DataError("--output: give the folder to write")
    if not 0 < o.validation_fraction < 1:
        raise DataError(f"--validation_fraction={o.validation_fraction}: must be in (0, 1)")
    for flag, value, least in (("--max_bytes", o.max_bytes, 0), ("--workers", o.workers, 1),
                               ("--shard_tokens", o.shard_tokens, 1), ("--bpe_vocab_size", o.bpe_vocab_size, 300)):
        if value < least:
            raise DataError(f"{flag}={value}: must be >= {least}")
    list_files(o.input)  # a missing input or an empty folder: one line naming --input
    out, source = pathlib.Path(o.output).expanduser().resolve(), pathlib.Path(o.input).expanduser().resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise DataError(f"--output={o.output}: inside --input={o.input}; choose a folder outside it")
    if o.tokenizer in TOKENIZERS:
        return None
    if not pathlib.Path(o.tokenizer).expanduser().is_file():
        raise DataError(f"--tokenizer={o.tokenizer}: no such file (give byte, bpe, a tokenizer.json "
                        "or a SentencePiece .model)")
    return load_tokenizer_file(pathlib.Path(o.tokenizer).expanduser(), "--tokenizer")


def _settings(o: PrepareOptions, given: Tokenizer | None) -> dict:
    """What the output depends on (not the paths as typed, nor the worker count)."""
    if given is not None:
        data = pathlib.Path(o.tokenizer).expanduser().read_bytes()
        tokenizer = {"kind": "file", "name": pathlib.Path(o.tokenizer).name, "sha256": hashlib.sha256(data).hexdigest()}
    else:
        tokenizer = {"kind": o.tokenizer, **({"bpe_vocab_size": o.bpe_vocab_size} if o.tokenizer == "bpe" else {})}
    return {"format": FORMAT, "version": VERSION, "files": file_digests(o.input), "tokenizer": tokenizer,
            "validation_fraction": o.validation_fraction, "max_bytes": o.max_bytes,
            "shard_tokens": o.shard_tokens, "chunk_chars": o.chunk_chars}


def _difference(saved, settings: dict) -> str | None:
    """The first setting that differs, in words; None when they all match."""
    saved = saved if isinstance(saved, dict) else {}
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            if key == "files":
                return "the input files differ"
            return f"{key}={settings.get(key)!r} now, {saved.get(key)!r} there"
    return None


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _check_output(out: pathlib.Path, partial: pathlib.Path, settings: dict) -> dict | None:
    """None: go on (afresh or resuming DIR.partial); an index: DIR is already this preparation."""
    where = f"--output={out}"
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DataError(f"{where}: is a file, not a folder")
        if (out / INDEX).is_file():
            index = _read_json(out / INDEX)
            diff = _difference(index.get("settings") if index else None, settings)
            if diff is None:
                return index
            raise DataError(f"{where}: holds data prepared from another input or settings ({diff}); "
                            "remove it or choose another --output")
        if any(out.iterdir()):
            raise DataError(f"{where}: exists and is not a prepared folder; choose another --output")
    if partial.is_dir():
        if (partial / PROGRESS).is_file():
            diff = _difference((_read_json(partial / PROGRESS) or {}).get("settings"), settings)
            if diff is not None:
                raise DataError(f"{where}: {partial} holds an unfinished preparation of another input or settings "
                                f"({diff}); remove it, or rerun the command that started it")
        elif any(p.name != LOCK_FILE for p in partial.iterdir()):
            raise DataError(f"{where}: {partial} exists and is not an unfinished preparation; remove it")
    elif partial.exists():
        raise DataError(f"{where}: {partial} is in the way (a file); remove it")
    return None


def _save(path: pathlib.Path, value: dict) -> None:
    """Write JSON through a synced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _start(partial: pathlib.Path, settings: dict, log) -> dict:
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output: cannot create {partial} ({e.strerror or e})") from e
    progress = _read_json(partial / PROGRESS)
    if progress is None:
        progress = {"format": FORMAT, "settings": settings, "splits": {}}
        _save(partial / PROGRESS, progress)
    else:
        for state in progress["splits"].values():  # keep the shards still there whole; redo the rest
            kept = 0
            while kept < len(state["shards"]) and _intact(partial / state["shards"][kept]["file"], state["shards"][kept]):
                kept += 1
            if kept < len(state["shards"]):
                del state["shards"][kept:]
                state["done"] = False
        done = ", ".join(f"{s} {len(v['shards'])}" for s, v in progress["splits"].items()) or "none"
        log(f"resuming {partial}: finished shards kept: {done}")
    return progress


def _intact(file: pathlib.Path, shard: dict) -> bool:
    try:
        return file.stat().st_size == shard["bytes"]
    except OSError:
        return False


def _tokenizer(o: PrepareOptions, partial: pathlib.Path, given: Tokenizer | None, log) -> tuple[Tokenizer, str | None]:
    """The tokenizer, saved into ``partial``; and its file name there (None: the byte tokenizer)."""
    if o.tokenizer == "byte":
        (partial / BYTE_NOTE).write_text(BYTE_TEXT, encoding="utf-8")
        return ByteTokenizer(), None
    if isinstance(given, SentencePieceTokenizer):
        (partial / "tokenizer.model").write_bytes(given.model_proto)
        return given, "tokenizer.model"
    saved = partial / "tokenizer.json"
    if isinstance(given, BPETokenizer):
        given.save(saved)  # with the special tokens it may have gained on loading: the ids the shards hold
        return given, "tokenizer.json"
    if saved.is_file():  # trained before an interruption
        return BPETokenizer.load(saved, "--output"), "tokenizer.json"
    log(f"training a byte-level BPE of {o.bpe_vocab_size} ids on the train split (once)")
    tokenizer = train_bpe(document_split(o.data_config(), "train")[1], o.bpe_vocab_size)
    tokenizer.save(saved)
    return tokenizer, "tokenizer.json"


def _write_split(split: str, o: PrepareOptions, spec: tuple, where: tuple[pathlib.Path, int], progress: dict,
                 log, bar: bool) -> None:
    """Write ``split``'s shards into ``where`` = (folder, vocabulary size), resuming after its last one."""
    from tqdm import tqdm

    partial, vocab_size = where
    state = progress["splits"].setdefault(split, {"shards": [], "done": False})
    if state["done"]:
        return
    shards = state["shards"]
    at = shards[-1]["next"] if shards else {"chunk": 0, "offset": 0, "text_bytes": 0, "documents": 0, "replaced": 0}
    if at["chunk"] is not None:  # else every shard was written; only the split's totals were not
        files, docs = document_split(o.data_config(), split)

        def on_shard(record: dict) -> None:
            shards.append(record)
            _save(partial / PROGRESS, progress)

        writer = _ShardWriter(partial, split, len(shards), o.shard_tokens, vocab_size, on_shard)
        counters = {key: at[key] for key in ("text_bytes", "documents", "replaced")}
        with tqdm(total=_estimate(files, o, split), initial=counters["text_bytes"], unit="B", unit_scale=True,
                  unit_divisor=1024, desc=f"{split}: tokenizing", file=sys.stderr, disable=not bar,
                  leave=False) as progress_bar:
            for c, (tokens_N, *counts) in encoded(chunks(docs, o.chunk_chars), spec, o.workers, at["chunk"]):
                skipped = at["offset"] if c == at["chunk"] else 0
                writer.write(tokens_N[skipped:], c, skipped, dict(counters))
                counters = {key: value + add for (key, value), add in zip(counters.items(), counts, strict=True)}
                progress_bar.update(counts[0])
        writer.close(counters)
        if not shards:
            raise empty_split_error(o.data_config(), split, files)
        at = counters
    state.update(done=True, text_bytes=at["text_bytes"], documents=at["documents"], replaced=at["replaced"],
                 tokens=sum(s["tokens"] for s in shards))
    _save(partial / PROGRESS, progress)
    log(f"{split}: {state['tokens']:,} tokens from {state['text_bytes']:,} bytes of text in "
        f"{state['documents']:,} documents -> {len(shards)} shard(s)"
        + (f"; {state['replaced']:,} U+FFFD characters (undecodable input)" if state["replaced"] else ""))


def _estimate(files: list[pathlib.Path], o: PrepareOptions, split: str) -> int:
    """About the text bytes of ``split`` (for the progress bar)."""
    share = o.validation_fraction if split == "validation" else 1 - o.validation_fraction
    total = sum(f.stat().st_size for f in files) * share
    return int(min(total, o.max_bytes * share) if o.max_bytes else total)


def _finish(o: PrepareOptions, out: pathlib.Path, partial: pathlib.Path, progress: dict, tokenizer: Tokenizer,
            file: str | None, dtype: str, log) -> dict:
    settings = progress["settings"]
    kind = {None: "byte", "tokenizer.model": "sentencepiece"}.get(file, "bpe" if o.tokenizer == "bpe" else "hf")
    splits = {}
    for split in SPLITS:
        s = progress["splits"][split]
        splits[split] = {"tokens": s["tokens"], "text_bytes": s["text_bytes"], "documents": s["documents"],
                         "replaced_chars": s["replaced"], "eos_id": tokenizer.eos_id,
                         "shards": [{k: v for k, v in shard.items() if k != "next"} for shard in s["shards"]]}
    text = sum(v["text_bytes"] for v in splits.values())
    splits["validation"]["share"] = round(splits["validation"]["text_bytes"] / max(1, text), 6)
    log(f"validation: {splits['validation']['share']:.2%} of the text ({o.validation_fraction:.2%} asked)")
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype, "byte_order": "little",
             "tokenizer": {"kind": kind, "file": file, "identity": tokenizer_identity(tokenizer),
                           "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
                           "pad_id": tokenizer.pad_id},
             "splits": splits, "settings": settings, "source_fingerprint": fingerprint(settings)}
    index["fingerprint"] = fingerprint(index)
    index["input"] = o.input  # as typed: for the reader, not part of the fingerprint
    _save(partial / INDEX, index)  # last: a folder with an index is complete
    (partial / PROGRESS).unlink()
    (partial / LOCK_FILE).unlink(missing_ok=True)  # held until this process exits; not part of the folder
    if out.is_dir():
        out.rmdir()  # an empty folder given as --output (checked above)
    os.rename(partial, out)
    log(f"wrote {out}: {sum(s['tokens'] for s in splits.values()):,} tokens, {dtype} shards, tokenizer {kind}")
    return index
