"""Prepared data (moe-data prepare): the same tokens and batches as the raw text, shards read
lazily across their boundaries, resume after an interruption byte for byte, pretrained tokenizer
files, one-line errors, and a short training run and moe-eval on a prepared folder."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import slow_prepare_script, tiny_train_args
from train.cli import data_main, eval_main, generate_main, train_main
from train.core.checkpoint import Checkpoints
from train.data.config import DataConfig
from train.data.batches import TokenSource, TrainBatches, eval_batches, token_counts
from train.data.docsplit import document_split
from train.data.prepare import PrepareOptions, prepare
from train.data.prepared import ShardedTokens, open_prepared, open_run_data
from train.data.sources import corpus_texts, load_corpus
from train.data.tokenizers import BPETokenizer, build_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog café naïve def return class self 🚀 x = 1".split()


def text(seed: int, lines: int = 30) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=10)) for _ in range(lines)) + "\n"


def make_corpus(root: pathlib.Path) -> pathlib.Path:
    """A folder of .jsonl and text files (about 20 KB): the kinds data.path reads."""
    root.mkdir(parents=True)
    for i in range(6):
        records = [json.dumps({"text": text(10 * i + j, lines=4)}) for j in range(5)]
        (root / f"part{i}.jsonl").write_text("\n".join(records) + "\n\n")
    for i in range(3):
        (root / "code" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (root / "code" / f"m{i}.py").write_text(text(100 + i))
    return root


def opts(src, out, **kw) -> PrepareOptions:
    defaults = dict(validation_fraction=0.25, workers=1, shard_tokens=997, chunk_chars=700)
    return PrepareOptions(input=str(src), output=str(out), **{**defaults, **kw})


def quiet(message):
    pass


def files_of(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("prepared") / "corpus")
    records = [json.dumps({"text": text(200 + j, lines=8)}) for j in range(8)]
    (root.parent / "one.jsonl").write_text("\n".join(records) + "\n")  # one file, 8 documents
    return root


@pytest.fixture(scope="module")
def byte_folder(corpus):
    out = corpus.parent / "byte"
    prepare(opts(corpus, out, workers=2), log=quiet)  # two worker processes
    return out


# ---------------------------------------------------------------- the same tokens as the raw path
def split_stream(cfg: DataConfig, tokenizer, split: str) -> tuple[np.ndarray, int]:
    """(tokens, text bytes) of ``split`` as prepare splits it: the documents of ``document_split``, each then eos."""
    docs = list(document_split(cfg, split)[1])
    tokens = np.concatenate([piece for d in docs for piece in (tokenizer.encode(d), [tokenizer.eos_id])])
    return tokens, sum(len(d.encode()) for d in docs)


@pytest.mark.parametrize("tokenizer, single_file, max_bytes", [
    ("byte", False, 0), ("bpe", False, 0), ("byte", True, 0), ("bpe", True, 0), ("byte", False, 9000), ("byte", True, 3001)])
def test_prepared_tokens_equal_what_load_corpus_gives(tmp_path, corpus, tokenizer, single_file, max_bytes):
    """One file: what the raw data.path gives (split by position); several: their split by documents."""
    src = corpus.parent / "one.jsonl" if single_file else corpus
    index = prepare(opts(src, tmp_path / "out", tokenizer=tokenizer, bpe_vocab_size=300, shard_tokens=301,
                         max_bytes=max_bytes), log=quiet)
    cfg = DataConfig(path=str(src), tokenizer=tokenizer, bpe_vocab_size=300, validation_fraction=0.25,
                     max_bytes=max_bytes)
    texts = (lambda: corpus_texts(cfg, "train")) if single_file else (lambda: document_split(cfg, "train")[1])
    raw_tokenizer = build_tokenizer(cfg, None, texts)  # as moe-train on raw text
    prepared = open_prepared(tmp_path / "out")
    assert prepared.tokenizer().vocab_size == raw_tokenizer.vocab_size
    for split in ("train", "validation"):
        expected, text_bytes = split_stream(cfg, raw_tokenizer, split)
        if single_file:
            raw = load_corpus(cfg, raw_tokenizer, split)
            assert np.array_equal(raw.tokens, expected) and raw.num_bytes == text_bytes
        mine = prepared.corpus(split)
        assert np.array_equal(np.asarray(mine.tokens), expected), split
        assert mine.num_bytes == text_bytes == index["splits"][split]["text_bytes"]
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]["shards"]) > 1
    if tokenizer == "bpe":
        assert (tmp_path / "out" / "tokenizer.json").read_text() == raw_tokenizer.to_json()


def test_worker_count_does_not_change_a_byte(tmp_path, corpus, byte_folder):
    prepare(opts(corpus, tmp_path / "one"), log=quiet)
    assert files_of(tmp_path / "one") == files_of(byte_folder)


# ---------------------------------------------------------------- batches over the shards
def test_sharded_tokens_slice_across_shard_boundaries(byte_folder):
    tokens = open_prepared(byte_folder).corpus("train").tokens
    whole = np.asarray(tokens)
    assert isinstance(tokens, ShardedTokens) and len(tokens) == whole.size > 3 * 997
    for a, b in [(990, 1010), (0, 997), (997, 998), (5, 3000), (len(tokens) - 3, len(tokens)), (10, 10)]:
        assert np.array_equal(tokens[a:b], whole[a:b]), (a, b)
    assert tokens[996] == whole[996] and tokens[-1] == whole[-1]
    with pytest.raises(IndexError):
        tokens[len(tokens)]
    assert np.array_equal(token_counts(tokens, 259, block=500), np.bincount(whole, minlength=259))


def test_train_and_eval_batches_over_the_shards_equal_the_in_memory_ones(byte_folder):
    s, g = 16, 8
    lazy = open_prepared(byte_folder).corpus("train").tokens
    whole = np.asarray(lazy).astype(np.int32)
    mem, mapped = TrainBatches(whole, s, g, seed=3), TrainBatches(lazy, s, g, seed=3)
    assert mapped._tokens_N is lazy  # not copied: each window is read when its row is asked for
    per_epoch = mapped.num_records // g
    for i in range(per_epoch + 3):  # every record of the first epoch, and into the second
        a, b = mem.batch(i), mapped.batch(i)
        assert all(np.array_equal(a[k], b[k]) and b[k].dtype == np.int32 for k in a)
    crossing = [r for r in range(mapped.num_records) if (r * s) // 997 != (r * s + s) // 997]
    assert len(crossing) > 3  # records that span two shards were among them
    for _ in range(4):
        next(mapped)
    state = json.loads(json.dumps(mapped.get_state()))
    expected = [next(mapped) for _ in range(3)]
    resumed = TrainBatches(lazy, s, g, seed=0)
    resumed.set_state(state)
    assert all(np.array_equal(e[k], r[k]) for e, r in zip(expected, [next(resumed) for _ in range(3)]) for k in e)
    parts = [TrainBatches(lazy, s, g, seed=3, process_index=p, process_count=2).batch(5) for p in (0, 1)]
    for k in ("inputs", "targets"):
        assert np.array_equal(np.concatenate([p[k] for p in parts]), mem.batch(5)[k])
    val = open_prepared(byte_folder).corpus("validation").tokens
    for p in (0, 1):
        for a, b in zip(eval_batches(np.asarray(val), s, g, 0, p, 2), eval_batches(val, s, g, 0, p, 2), strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)


class Recording(TokenSource):
    """A token source that notes every slice read from it."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.reads.append((index.start, index.stop))
        return self.inner[index]


def test_each_process_reads_only_the_windows_of_its_own_rows(byte_folder):
    s, g = 16, 8
    prepared = open_prepared(byte_folder)
    train = Recording(prepared.corpus("train").tokens)
    batches = TrainBatches(train, s, g, seed=3, process_index=1, process_count=2)
    assert train.reads == []  # nothing read to set up
    batch = batches.batch(5)
    whole = TrainBatches(np.asarray(train.inner), s, g, seed=3).batch(5)
    assert len(train.reads) == 4 and all(b - a == s + 1 and a % s == 0 for a, b in train.reads)
    assert np.array_equal(batch["inputs"], whole["inputs"][4:])  # its 4 rows, from one window read for each
    val = Recording(prepared.corpus("validation").tokens)
    scored = eval_batches(val, s, g, 0, process_index=1, process_count=2)
    assert val.reads == [] and len(scored) > 2  # batches are built when asked for
    third = scored[2]
    assert len(val.reads) == 4 and [a for a, _ in val.reads] == [(2 * g + 4 + j) * s for j in range(4)]
    assert np.array_equal(third["inputs"], eval_batches(np.asarray(val.inner), s, g, 0, 1, 2)[2]["inputs"])


# ---------------------------------------------------------------- resuming an interrupted preparation
def test_kill_9_then_rerun_gives_byte_identical_output(tmp_path, corpus):
    out = tmp_path / "out"
    argv = [f"--input={corpus}", f"--output={out}", "--validation_fraction=0.25", "--shard_tokens=997", "--workers=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", slow_prepare_script(0.3), "prepare", *argv], env=env,
                            stderr=subprocess.DEVNULL)
    second = tmp_path / "out.partial" / "train-00001.bin"
    deadline = time.monotonic() + 120
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and second.exists() and not out.exists()
    first = (tmp_path / "out.partial" / "train-00000.bin").stat()
    assert data_main(["prepare", *argv]) == 0  # the same command again (its defaults: chunks of 1 Mi chars)
    reference = tmp_path / "reference"
    data_main(["prepare", *[a.replace(str(out), str(reference)) for a in argv]])
    assert files_of(out) == files_of(reference)
    assert (out / "train-00000.bin").stat().st_ino == first.st_ino  # kept, not written again
    assert not (tmp_path / "out.partial").exists()


def test_lost_shards_and_a_torn_one_are_redone_identically(tmp_path, corpus, byte_folder, monkeypatch):
    from train.data import prepare as p

    finish, calls = p._ShardWriter._finish, []

    def stop_after_five(self, position):
        finish(self, position)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, between two shards

    monkeypatch.setattr(p._ShardWriter, "_finish", stop_after_five)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with pytest.raises(KeyboardInterrupt):
        prepare(opts(corpus, out), log=quiet)
    monkeypatch.setattr(p._ShardWriter, "_finish", finish)
    (partial / "train-00004.bin").unlink()  # the last finished shard lost
    (partial / "train-00002.bin").write_bytes(b"torn")  # and one cut short
    (partial / ".train-00005.bin.tmp").write_bytes(b"half a shard")
    kept = (partial / "train-00001.bin").stat().st_ino
    messages = []
    prepare(opts(corpus, out), log=messages.append)
    assert "finished shards kept: train 2" in " ".join(messages)
    assert files_of(out) == files_of(byte_folder)
    assert (out / "train-00001.bin").stat().st_ino == kept


# ---------------------------------------------------------------- pretrained tokenizer files
def test_a_pretrained_tokenizer_json_from_a_path(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))  # not ours: other special tokens, no byte fallback
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator([text(7, 200)], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "</s>"]))
    hf.save(str(tmp_path / "pretrained.json"))
    index = prepare(opts(corpus, tmp_path / "out", tokenizer=str(tmp_path / "pretrained.json")), log=quiet)
    loaded = BPETokenizer.load(tmp_path / "pretrained.json")
    cfg = DataConfig(path=str(corpus), tokenizer="bpe", tokenizer_path=str(tmp_path / "pretrained.json"),
                     validation_fraction=0.25)
    expected, _ = split_stream(cfg, loaded, "train")
    assert np.array_equal(np.asarray(open_prepared(tmp_path / "out").corpus("train").tokens), expected)
    assert index["tokenizer"]["kind"] == "hf" and index["tokenizer"]["vocab_size"] == loaded.vocab_size
    assert open_prepared(tmp_path / "out").tokenizer().to_json() == loaded.to_json()


def test_a_sentencepiece_model_from_a_path(tmp_path, corpus):
    spm = pytest.importorskip("sentencepiece")
    model = tmp_path / "sp.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text(3, 300).splitlines()), model_writer=f,
                                       vocab_size=60, model_type="bpe", minloglevel=2)
    index = prepare(opts(corpus, tmp_path / "out", tokenizer=str(model)), log=quiet)
    cfg = DataConfig(path=str(corpus), tokenizer="bpe", tokenizer_path=str(model), validation_fraction=0.25)
    tokenizer = build_tokenizer(cfg, None, lambda: [])
    expected, _ = split_stream(cfg, tokenizer, "validation")
    assert index["tokenizer"]["kind"] == "sentencepiece" and (tmp_path / "out" / "tokenizer.model").read_bytes() == model.read_bytes()
    assert np.array_equal(np.asarray(open_prepared(tmp_path / "out").corpus("validation").tokens), expected)
    assert expected.max() < 60 and (expected == tokenizer.eos_id).sum() == index["splits"]["validation"]["documents"]


# ---------------------------------------------------------------- one line, exit 2, nothing written
def bad_prepare_cases(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n\n   \n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    done = tmp_path / "done"  # prepared with the same flags as every case, --shard_tokens=997
    return [
        ([f"--input={tmp_path / 'nope'}"], f"--input={tmp_path / 'nope'}: no such file or folder"),
        ([f"--input={tmp_path / 'empty'}"], f"--input={tmp_path / 'empty'}: the folder has no"),
        ([f"--input={tmp_path / 'blank.jsonl'}"], f"--input={tmp_path / 'blank.jsonl'}: the train split has no text"),
        (["--tokenizer=" + str(tmp_path / "bad.json")], f"--tokenizer={tmp_path / 'bad.json'}: not a valid tokenizer.json"),
        (["--tokenizer=" + str(tmp_path / "no.model")], f"--tokenizer={tmp_path / 'no.model'}: no such file"),
        (["--validation_fraction=1.5"], "--validation_fraction=1.5: must be in (0, 1)"),
        (["--workers=0"], "--workers=0: must be >= 1"),
        ([f"--output={done}", "--shard_tokens=500"],
         f"--output={done}: holds data prepared from another input or settings (shard_tokens=500 now, 997 there)"),
        ([f"--output={done}", f"--input={corpus / 'code'}"],
         f"--output={done}: holds data prepared from another input or settings (the input files differ)"),
        ([f"--output={tmp_path / 'other'}"], f"--output={tmp_path / 'other'}: exists and is not a prepared folder"),
        ([f"--output={corpus / 'inside'}"], f"--output={corpus / 'inside'}: inside --input={corpus}"),
    ]


def test_moe_data_bad_input_gets_one_line_exit_2_and_writes_nothing(tmp_path, corpus, capsys):
    flags = ["--validation_fraction=0.25", "--shard_tokens=997"]
    assert data_main(["prepare", f"--input={corpus}", f"--output={tmp_path / 'done'}", *flags]) == 0
    assert data_main(["prepare", f"--input={corpus}", f"--output={tmp_path / 'done'}", *flags]) == 0  # done: a no-op
    capsys.readouterr()
    before = {p: files_of(p) for p in (corpus, tmp_path / "done")}
    for argv, message in bad_prepare_cases(tmp_path, corpus):
        given = {"--input": f"--input={corpus}", "--output": f"--output={tmp_path / 'out'}"}
        given.update({arg.split("=")[0]: arg for arg in argv})
        with pytest.raises(SystemExit) as exc:
            data_main(["prepare", *flags, *given.values()])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith(f"moe-data: {message}") and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), argv
    assert {p: files_of(p) for p in (corpus, tmp_path / "done")} == before and not (corpus / "inside").exists()


def damage(folder: pathlib.Path, how: str) -> str:
    """Break a copy of a prepared folder; the message moe-train must give."""
    where = f"data.path={folder}"
    if how == "short shard":
        (folder / "train-00001.bin").write_bytes((folder / "train-00001.bin").read_bytes()[:-6])
        return f"{where}: shard train-00001.bin has 1988 bytes; index.json says 997 tokens of 2 bytes = 1994 bytes"
    if how == "missing shard":
        (folder / "validation-00000.bin").unlink()
        return f"{where}: shard validation-00000.bin is missing"
    if how == "missing index":
        (folder / "index.json").unlink()
        return f"{where}: a prepared folder without its index.json"
    if how == "corrupt index":
        (folder / "index.json").write_text((folder / "index.json").read_text()[:200])
        return f"{where}: index.json cannot be read"
    return {"bpe setting": "data.tokenizer=bpe: " + where + " was prepared with the byte tokenizer",
            "tokenizer_path setting": f"data.tokenizer_path={ROOT / 'pyproject.toml'}: {where} is a prepared folder"}[how]


@pytest.mark.parametrize("how", ["short shard", "missing shard", "missing index", "corrupt index", "bpe setting",
                                 "tokenizer_path setting"])
def test_a_damaged_prepared_folder_or_a_contradicting_setting_stops_moe_train_in_one_line(tmp_path, byte_folder, capsys, how):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(byte_folder, folder)
    message = damage(folder, how)
    extra = {"bpe setting": ["--config.data.tokenizer=bpe"],
             "tokenizer_path setting": [f"--config.data.tokenizer_path={ROOT / 'pyproject.toml'}"]}.get(how, [])
    with pytest.raises(SystemExit) as exc:
        train_main([f"--config={ROOT / 'configs/default.py'}", f"--workdir={tmp_path / 'w'}",
                    f"--config.data.path={folder}", *extra])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- training and scoring on a prepared folder
def test_train_eval_and_generate_on_a_prepared_bpe_folder(tmp_path, capsys):
    args = tiny_train_args(tmp_path, tmp_path / "run", steps=2)
    raw = tmp_path / "corpus"  # tiny_train_args wrote it
    folder = tmp_path / "data"
    assert data_main(["prepare", f"--input={raw}", f"--output={folder}", "--tokenizer=bpe", "--bpe_vocab_size=300",
                      "--validation_fraction=0.25", "--shard_tokens=1000", "--workers=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    args = [a.replace(f"--config.data.path={raw}", f"--config.data.path={folder}") for a in args]
    assert train_main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["tokenizer"] == "bpe" and config["data"]["path"] == str(folder)
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert config["model"]["vocab_size"] >= summary["vocab_size"] > 259
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
    meta, data_state = checkpoints.read_meta(2)
    checkpoints.close()
    notes = []
    run = open_run_data(DataConfig(path=str(folder)), tmp_path / "run", write=False, log=notes.append)
    assert notes == [f"data.path={folder}: a prepared folder; its preparation settings apply: "
                     "data.tokenizer='byte' -> 'bpe', data.bpe_vocab_size=2048 -> 300, data.validation_fraction=0.05 -> 0.25"]
    assert meta["data_fingerprint"] == run.fingerprint == open_prepared(folder).fingerprint  # from index.json
    assert data_state["next_batch"] == 2 and data_state["num_records"] == (summary["train_tokens"] - 1) // 16
    assert eval_main([f"--workdir={tmp_path / 'run'}"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["tokens"] == summary["validation_tokens"] - 1  # every validation token after the first, once
    assert eval_main([f"--workdir={tmp_path / 'run'}", f"--data_path={folder}", "--max_batches=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 8 * 16
    assert generate_main([f"--workdir={tmp_path / 'run'}", "--prompt=def add", "--max_new_tokens=3"]) == 0
    assert capsys.readouterr().out.startswith("def add")
