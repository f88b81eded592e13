"""Prepared data refuses to be silently wrong: damaged shards, binary input, a lopsided split, a
second writer; and the token counts routers fit come from the index, not from reading the split."""

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import slow_prepare_script, tiny_train_args
from train.cli import data_main, train_main
from train.data.config import DataConfig
from train.data import batches
from train.data.batches import split_counts, token_counts
from train.data.prepare import PrepareOptions, prepare
from train.data.prepared import ShardedTokens, open_prepared, open_run_data
from train.data.shards import VERIFY_ALL_BYTES, encode_counts, sample_shards
from train.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta café 🚀 def return".split()


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n)) + "\n"


def opts(src, out, **kw) -> PrepareOptions:
    return PrepareOptions(input=str(src), output=str(out), **{**dict(workers=1, shard_tokens=997, chunk_chars=700), **kw})


def one_line_exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        data_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    (root / "in").mkdir()
    for i in range(3):
        (root / "in" / f"f{i}.txt").write_text(words(i, 800))
    prepare(opts(root / "in", root / "byte", validation_fraction=0.2), log=lambda m: None)
    return root / "byte"


def copy(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(folder, tmp_path / "data")
    return tmp_path / "data"


# ---------------------------------------------------------------- 1. shards checked against the index
def test_a_shard_with_ids_outside_the_vocabulary_stops_moe_train_and_fails_verify(tmp_path, folder, capsys):
    data = copy(folder, tmp_path)
    shard = data / "train-00002.bin"
    shard.write_bytes(np.full(997, 4000, "<u2").tobytes())  # same size: only the contents are wrong
    with pytest.raises(SystemExit) as exc:
        train_main([f"--config={ROOT / 'configs/default.py'}", f"--workdir={tmp_path / 'w'}", f"--config.data.path={data}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"data.path={data}: shard train-00002.bin: its SHA-256 is not the one index.json records" in err
    assert not (tmp_path / "w").exists()
    assert data_main(["verify", f"--data={data}"]) == 2
    assert capsys.readouterr().err.strip() == (f"moe-data: --data={data}: shard train-00002.bin: its SHA-256 is not the "
                                               "one index.json records (the file changed after it was written)")


def test_verify_reads_the_ids_themselves_when_the_index_was_rewritten_to_match(tmp_path, folder, capsys):
    import hashlib

    data = copy(folder, tmp_path)
    bad = np.frombuffer((data / "validation-00000.bin").read_bytes(), "<u2").copy()
    bad[5] = 300  # outside the byte tokenizer's 259 ids
    (data / "validation-00000.bin").write_bytes(bad.tobytes())
    index = json.loads((data / "index.json").read_text())
    index["splits"]["validation"]["shards"][0]["sha256"] = hashlib.sha256(bad.tobytes()).hexdigest()
    (data / "index.json").write_text(json.dumps(index))
    assert data_main(["verify", f"--data={data}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moe-data: --data={data}: shard validation-00000.bin holds token id 300, outside the vocabulary of 259 ids"]
    index["splits"]["train"]["shards"][1]["max_id"] = 512  # and an index that admits it is refused when opened
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="shard train-00001.bin holds token id 512 .index.json., outside the tokenizer's "
                                        "vocabulary of 259 ids"):
        open_prepared(data)


def test_verify_passes_a_whole_folder_and_names_every_bad_shard(tmp_path, folder, capsys):
    assert data_main(["verify", f"--data={folder}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True
    data = copy(folder, tmp_path)
    for name in ("train-00000.bin", "train-00003.bin"):
        raw = bytearray((data / name).read_bytes())
        raw[0] ^= 1
        (data / name).write_bytes(bytes(raw))
    assert data_main(["verify", f"--data={data}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": shard ")[1].split(":")[0] for line in lines] == ["train-00000.bin", "train-00003.bin"]
    assert one_line_exit_2(["verify", f"--data={tmp_path / 'nope'}"], capsys) == f"moe-data: --data={tmp_path / 'nope'}: no such folder"


def test_a_start_verifies_every_shard_below_the_budget_else_first_last_and_one_by_date():
    small = [{"bytes": 10} for _ in range(50)]
    assert sample_shards(small, "f") == small
    big = [{"bytes": VERIFY_ALL_BYTES // 4, "k": k} for k in range(40)]
    days = [datetime.date(2026, 1, d) for d in range(1, 29)]
    picks = [[s["k"] for s in sample_shards(big, "f", day)] for day in days]
    assert all(p[0] == 0 and p[-1] == 39 and len(p) <= 3 for p in picks)
    assert picks[0] == [s["k"] for s in sample_shards(big, "f", days[0])]  # the same on every process that day
    assert len({tuple(p) for p in picks}) > 10  # another middle shard on other days


# ---------------------------------------------------------------- 2. binary or undecodable input
def test_binary_input_is_refused_unless_allowed_and_undecodable_bytes_are_counted(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "text.txt").write_text(words(1, 2000))
    (src / "blob.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 150_000, dtype=np.uint8).tobytes())
    argv = ["prepare", f"--input={src}", f"--output={tmp_path / 'out'}", "--workers=1"]
    err = one_line_exit_2(argv, capsys)
    assert err.startswith(f"moe-data: --input={src}: {src / 'blob.bin'} looks binary (a NUL byte at offset ")
    assert "--allow_binary" in err and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert data_main([*argv, "--allow_binary"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["replaced_chars"] > 50_000
    assert f"undecodable bytes become U+FFFD: {src / 'blob.bin'}: a NUL byte" in captured.err
    (src / "blob.bin").unlink()
    (src / "latin1.txt").write_bytes(("café naïve " * 500).encode("latin-1"))  # text, in the wrong encoding
    assert data_main(["prepare", f"--input={src}", f"--output={tmp_path / 'out2'}", "--workers=1"]) == 0
    captured = capsys.readouterr()
    assert f"{src / 'latin1.txt'}: 1000 undecodable bytes in its first 64 KiB" in captured.err
    index = json.loads((tmp_path / "out2" / "index.json").read_text())
    assert sum(s["replaced_chars"] for s in index["splits"].values()) == 1000


# ---------------------------------------------------------------- 3. the split, by documents
def test_two_files_are_split_by_documents_close_to_the_asked_fraction(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(words(2, 30_000))
    (src / "b.jsonl").write_text("".join(json.dumps({"text": words(100 + j, 300)}) + "\n" for j in range(60)))
    for fraction in (0.05, 0.3):
        out = tmp_path / f"out{fraction}"
        assert data_main(["prepare", f"--input={src}", f"--output={out}", "--workers=1",
                          f"--validation_fraction={fraction}"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert abs(summary["validation_share"] - fraction) <= 0.1 * fraction, summary
        tokens = {s: np.asarray(open_prepared(out).corpus(s).tokens) for s in ("train", "validation")}
        assert sum(len(t) for t in tokens.values()) == (src / "a.txt").stat().st_size + sum(
            len(json.loads(line)["text"].encode()) for line in (src / "b.jsonl").read_text().splitlines()) + \
            sum(int((t == 258).sum()) for t in tokens.values())  # every byte once, plus an eos per document
    index = json.loads((tmp_path / "out0.3" / "index.json").read_text())
    assert index["splits"]["validation"]["share"] == summary["validation_share"]


def documents_of(tokens: np.ndarray) -> list[str]:
    """The documents of a byte-tokenized stream (each ends with eos, 258)."""
    ends = np.flatnonzero(tokens == 258)
    return [bytes(tokens[a + 1 : b].astype(np.uint8)).decode() for a, b in zip([-1, *ends[:-1]], ends)]


def test_whole_documents_go_to_validation_unless_one_is_huge(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    docs = [words(j, 50 + 7 * j) for j in range(40)]
    for i in range(2):
        (src / f"p{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[20 * i : 20 * i + 20]))
    for fraction in (0.1, 0.37):
        prepare(opts(src, tmp_path / f"out{fraction}", validation_fraction=fraction), log=lambda m: None)
        split = {s: documents_of(np.asarray(open_prepared(tmp_path / f"out{fraction}").corpus(s).tokens))
                 for s in ("train", "validation")}
        assert sorted(split["train"] + split["validation"]) == sorted(docs)  # each document whole, in one split
        share = sum(len(d) for d in split["validation"]) / sum(len(d) for d in docs)
        assert abs(share - fraction) <= 0.1 * fraction
    prepare(opts(src, tmp_path / "again", validation_fraction=0.1), log=lambda m: None)
    assert files_equal(tmp_path / "again", tmp_path / "out0.1")
    (src / "p0.jsonl").write_text(json.dumps({"text": words(7, 20_000)}) + "\n")  # two huge documents: one is cut
    (src / "p1.jsonl").write_text(json.dumps({"text": words(8, 20_000)}) + "\n")
    prepare(opts(src, tmp_path / "huge", validation_fraction=0.1), log=lambda m: None)
    index = json.loads((tmp_path / "huge" / "index.json").read_text())
    assert abs(index["splits"]["validation"]["share"] - 0.1) <= 0.01 and index["splits"]["train"]["documents"] == 2


def files_equal(a: pathlib.Path, b: pathlib.Path) -> bool:
    return all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir()) and len(list(a.iterdir())) == len(list(b.iterdir()))


# ---------------------------------------------------------------- 4. messages and the output lock
def test_a_shard_size_message_says_what_was_compared(tmp_path, folder):
    data = copy(folder, tmp_path)
    (data / "train-00001.bin").write_bytes((data / "train-00001.bin").read_bytes()[:-6])
    with pytest.raises(DataError, match="shard train-00001.bin has 1988 bytes; index.json says 997 tokens of 2 bytes "
                                        "= 1994 bytes"):
        open_prepared(data)
    (data / "train-00001.bin").write_bytes(b"\0" * 1994)
    index = json.loads((data / "index.json").read_text())
    index["splits"]["train"]["shards"][1]["bytes"] = 2000
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="shard train-00001.bin has 1994 bytes; index.json's bytes field says 2000"):
        open_prepared(data)


def test_a_tokenizer_file_with_the_wrong_schema_says_so(tmp_path, folder, capsys):
    src = folder.parent / "in"
    (tmp_path / "schema.json").write_text('{"vocab": {"a": 0}}')
    (tmp_path / "syntax.json").write_text('{"vocab": ')
    for name, says in (("schema.json", "JSON, but not the Hugging Face tokenizer.json schema ("),
                       ("syntax.json", "not a valid tokenizer.json (not JSON: Expecting value at line 1 column 11)")):
        err = one_line_exit_2(["prepare", f"--input={src}", f"--output={tmp_path / 'out'}",
                               f"--tokenizer={tmp_path / name}"], capsys)
        assert err.startswith(f"moe-data: --tokenizer={tmp_path / name}: {says}"), err


def test_a_second_prepare_on_one_output_is_refused_naming_the_first(tmp_path, folder, capsys):
    src, out = folder.parent / "in", tmp_path / "out"
    argv = ["prepare", f"--input={src}", f"--output={out}", "--workers=1", "--shard_tokens=997"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", slow_prepare_script(0.5), *argv], env=env,
                             stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out.partial" / "train-00000.bin").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    err = one_line_exit_2(argv, capsys)
    assert err.startswith(f"moe-data: --output={out}: another moe-data prepare is writing it (host ")
    assert f"PID {first.pid}," in err
    assert first.wait(timeout=300) == 0 and not (tmp_path / "out.partial").exists()
    assert not (out / ".lock").exists() and data_main(argv) == 0  # done: a no-op


# ---------------------------------------------------------------- 5. token counts from the index
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_the_summed_histograms_equal_token_counts_of_the_split(tmp_path, folder, tokenizer):
    out = folder if tokenizer == "byte" else tmp_path / "bpe"
    if tokenizer == "bpe":
        prepare(opts(folder.parent / "in", out, tokenizer="bpe", bpe_vocab_size=300, validation_fraction=0.2),
                log=lambda m: None)
    prepared = open_prepared(out)
    vocab = prepared.index["tokenizer"]["vocab_size"]
    for split in ("train", "validation", "all"):
        corpus = prepared.corpus(split)
        for v in (vocab, -(-vocab // 64) * 64, 100):  # the model's vocabulary may be rounded up; or smaller
            assert np.array_equal(split_counts(corpus, v), token_counts(corpus.tokens, v))


def test_fitting_routers_on_a_prepared_folder_reads_no_token(tmp_path, monkeypatch):
    args = tiny_train_args(tmp_path, tmp_path / "run", steps=2)
    raw, data = tmp_path / "corpus", tmp_path / "data"
    prepare(opts(raw, data, validation_fraction=0.25), log=lambda m: None)
    index = json.loads((data / "index.json").read_text())
    assert all(isinstance(s["counts"], str) for s in index["splits"]["train"]["shards"])
    assert index["splits"]["train"]["shards"][0]["counts"] == encode_counts(
        np.bincount(np.fromfile(data / "train-00000.bin", "<u2"), minlength=259))

    def no_reading(*a, **k):
        raise AssertionError("token_counts read the split")

    monkeypatch.setattr(batches, "token_counts", no_reading)
    assert train_main([a.replace(f"--config.data.path={raw}", f"--config.data.path={data}") for a in args]) == 0
    run = open_run_data(DataConfig(path=str(data)), tmp_path / "run", write=False, log=lambda m: None)
    assert isinstance(run.train.tokens, ShardedTokens) and run.train.counts is not None
