"""Data pipeline and tokenizers: determinism, epochs, sharding, resume, sources, errors."""

import json
import pathlib
import sysconfig

import numpy as np
import pytest

from train.data.batches import TrainBatches, eval_batches
from train.data.config import DataConfig
from train.data.sources import (
    DataError,
    corpus_texts,
    data_fingerprint,
    list_files,
    load_corpus,
    read_documents,
    split_files,
)
from train.data.tokenizers import BPETokenizer, ByteTokenizer, build_tokenizer, train_bpe

S = 8  # sequence length used throughout


def arange_batches(num_records=48, global_batch=8, seed=0, **kw):
    """Tokens 0..N-1, so a row's record id is inputs[0] // S."""
    return TrainBatches(np.arange(num_records * S + 1), S, global_batch, seed, **kw)


def record_ids(batch):
    return (batch["inputs"][:, 0] // S).tolist()


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- training batches
BAD_DATA = [
    ({"tokenizer": "sentencepiece"}, "config.data.tokenizer='sentencepiece': choose byte or bpe"),
    ({"bpe_vocab_size": 299}, "config.data.bpe_vocab_size=299: must be >= 300"),
    ({"validation_fraction": 1.0}, "config.data.validation_fraction=1.0: must be in (0, 1)"),
    ({"validation_fraction": 0.0}, "config.data.validation_fraction=0.0: must be in (0, 1)"),
    ({"max_bytes": -1}, "config.data.max_bytes=-1: must be >= 0 (0 = all)"),
    ({"special_tokens": "a,b"}, "config.data.special_tokens='a,b': three comma-separated tokens PAD,BOS,EOS"),
    ({"special_tokens": "a,,c"}, "config.data.special_tokens='a,,c': three comma-separated tokens PAD,BOS,EOS"),
    ({"tokenizer_path": "/no/such.json"}, "config.data.tokenizer_path='/no/such.json': no such file"),
]


@pytest.mark.parametrize("fields,message", BAD_DATA)
def test_each_data_rule_lives_in_data_config_and_reaches_validate_as_one_message(fields, message):
    from moe.fields import FieldError
    from train.core.config import Config, validate
    from train.errors import ConfigError

    with pytest.raises(FieldError) as own:
        DataConfig(**fields).check()
    assert f"config.data.{own.value.field}={own.value.value!r}: {own.value.why}".startswith(message)
    cfg = Config()
    cfg.data = DataConfig(**fields)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(message)
    assert DataConfig(special_tokens="</s>,<s>,</s>").check() and DataConfig().check()


def test_same_seed_same_batches_different_seed_different():
    a, b, c = arange_batches(seed=1), arange_batches(seed=1), arange_batches(seed=2)
    xs, ys, zs = [next(a) for _ in range(6)], [next(b) for _ in range(6)], [next(c) for _ in range(6)]
    assert all(same(x, y) for x, y in zip(xs, ys, strict=True))
    assert not all(same(x, z) for x, z in zip(xs, zs, strict=True))
    assert xs[0]["inputs"].dtype == np.int32 and xs[0]["inputs"].shape == (8, S)


def test_targets_are_inputs_shifted_by_one():
    tokens = np.random.default_rng(0).integers(0, 259, size=40 * S + 1)
    batches = TrainBatches(tokens, S, 4, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    plain = arange_batches()
    batch = plain.batch(3)
    assert np.array_equal(batch["targets"], batch["inputs"] + 1)
    assert np.all(batch["inputs"][:, 0] % S == 0)  # windows start at multiples of S (stride S)


def test_each_epoch_is_a_new_permutation_of_all_records():
    num_records, g = 48, 8
    batches = arange_batches(num_records, g, seed=3)
    per_epoch = num_records // g
    epochs = [sum((record_ids(batches.batch(e * per_epoch + i)) for i in range(per_epoch)), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(num_records))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(num_records))


def test_epoch_boundary_inside_a_batch_still_covers_every_record():
    batches = arange_batches(num_records=10, global_batch=4, seed=0)  # 2.5 batches per epoch
    ids = sum((record_ids(batches.batch(i)) for i in range(5)), [])  # 20 records = 2 epochs
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))


@pytest.mark.parametrize("index", [0, 1, 5, 13, 100])
def test_process_shards_concatenate_to_the_global_batch(index):
    whole = arange_batches(global_batch=8, seed=7).batch(index)
    parts = [arange_batches(global_batch=8, seed=7, process_index=p, process_count=2).batch(index) for p in (0, 1)]
    for key in whole:
        assert parts[0][key].shape == (4, S)
        assert np.array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_get_state_set_state_resumes_exactly():
    batches = arange_batches(seed=11)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(batches.get_state()))
    expected = [next(batches) for _ in range(8)]  # crosses an epoch boundary (6 batches per epoch)
    fresh = arange_batches(seed=999)  # the state carries the seed
    fresh.set_state(state)
    assert all(same(a, b) for a, b in zip(expected, [next(fresh) for _ in range(8)], strict=True))
    assert fresh.get_state()["next_batch"] == state["next_batch"] + 8


def test_batching_errors():
    with pytest.raises(DataError, match=r"data.path=corpus.txt: 5 tokens, fewer than train.seq_len\+1=9"):
        TrainBatches(np.arange(5), S, 2, 0, data_path="corpus.txt")
    with pytest.raises(ValueError, match="train.batch_size=6"):
        arange_batches(global_batch=6, process_count=4)
    with pytest.raises(DataError, match="train.seq_len"):
        TrainBatches(np.arange(100), 4, 8, 0).set_state(arange_batches().get_state())


# ---------------------------------------------------------------- evaluation batches
@pytest.mark.parametrize("num_tokens", [2, 37, 8 * S * 3 + 1, 500])
def test_eval_batches_score_every_token_exactly_once(num_tokens):
    tokens = np.arange(num_tokens)
    batches = eval_batches(tokens, S, 8, 0)
    scored = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    assert np.array_equal(scored, tokens[1:])  # each predicted token once, in order
    for b in batches:
        w = b["weights"] > 0
        assert np.array_equal(b["targets"][w], b["inputs"][w] + 1)
    sharded = [eval_batches(tokens, S, 8, 0, process_index=p, process_count=2) for p in (0, 1)]
    assert len(sharded[0]) == len(sharded[1]) == len(batches)
    for whole, p0, p1 in zip(batches, *sharded, strict=True):
        for key in ("inputs", "targets", "weights"):
            assert np.array_equal(np.concatenate([p0[key], p1[key]]), whole[key])
    assert sum(b["weights"].sum() for s in sharded for b in s) == num_tokens - 1


def test_eval_batches_max_batches():
    batches = eval_batches(np.arange(1000), S, 4, 3)
    assert len(batches) == 3 and all(b["weights"].min() == 1 for b in batches)
    assert batches[0]["weights"].dtype == np.float32
    assert np.array_equal(batches[2]["inputs"][0], np.arange(8 * S, 9 * S))


# ---------------------------------------------------------------- sources
def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def test_text_file(tmp_path):
    text = "line one\nzwei: grüße ✓\n" * 20
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    cfg = cfg_for(tmp_path / "a.txt", validation_fraction=0.25)
    tok = ByteTokenizer()
    train, val = load_corpus(cfg, tok, "train"), load_corpus(cfg, tok, "validation")
    assert train.tokens.dtype == np.int32 and train.tokens[-1] == tok.eos_id == val.tokens[-1]
    # one file: split by position; the two parts are the whole text
    assert tok.decode(train.tokens) + tok.decode(val.tokens) == text
    assert train.num_bytes + val.num_bytes == len(text.encode())
    assert val.num_bytes < train.num_bytes and train.files == val.files == [str(tmp_path / "a.txt")]
    capped = load_corpus(cfg_for(tmp_path / "a.txt", max_bytes=50), tok, "train")
    assert capped.num_bytes <= 50


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ["b.txt", "a/z.txt", "a/b/c.md", ".hidden", ".git/x.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"text of {rel}\n")
    files = list_files(str(tmp_path))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/b/c.md", "a/z.txt", "b.txt"]
    train, val = split_files(files, 0.3)
    assert train and val and sorted(train + val) == sorted(files)
    assert split_files(files, 0.3) == (train, val)
    cfg = cfg_for(tmp_path, validation_fraction=0.3)
    tok = ByteTokenizer()
    corpus = load_corpus(cfg, tok, "train")
    assert corpus.files == [str(f) for f in train]
    expected = "".join(f.read_text() + "\x00" for f in train)  # \x00 marks each eos below
    got = "".join("\x00" if t == tok.eos_id else chr(t) for t in corpus.tokens)
    assert got == expected and corpus.num_bytes == sum(f.stat().st_size for f in train)
    assert list(corpus_texts(cfg)) == [f.read_text() for f in train]


def test_glob_pattern(tmp_path):
    for name in ["x1.txt", "x2.txt", "y.txt"]:
        (tmp_path / name).write_text(name)
    files = list_files(str(tmp_path / "x*.txt"))
    assert [f.name for f in files] == ["x1.txt", "x2.txt"]


def test_jsonl(tmp_path):
    file = tmp_path / "docs.jsonl"
    docs = [f"document {i}: héllo" for i in range(10)]
    file.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert read_documents(file) == docs
    tok = ByteTokenizer()
    cfg = cfg_for(file, validation_fraction=0.2)
    both = [load_corpus(cfg, tok, split).tokens for split in ("train", "validation")]
    assert sum(int((t == tok.eos_id).sum()) for t in both) >= len(docs)
    assert tok.decode(np.concatenate(both)) == "".join(docs)


@pytest.mark.parametrize("kind", ["empty-file", "empty-folder", "glob-no-match", "missing"])
def test_bad_paths_name_the_path(tmp_path, kind):
    names = {"empty-file": "empty.txt", "empty-folder": "empty", "glob-no-match": "nothing*.txt"}
    path = tmp_path / names.get(kind, "missing.txt")
    if kind == "empty-file":
        path.write_text("")
    elif kind == "empty-folder":
        path.mkdir()
    with pytest.raises(DataError) as err:
        load_corpus(cfg_for(path), ByteTokenizer(), "train")
    assert str(err.value).startswith(f"data.path={path}")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=rf"^{file}:2: "):
        load_corpus(cfg_for(file), ByteTokenizer(), "train")
    file.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=rf"^{file}:2: not valid JSON"):
        read_documents(file)


def test_default_stdlib_corpus():
    files = list_files("")
    assert len(files) > 200 and list_files("") == files
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and not any("site-packages" in r for r in rel)
    train, val = split_files(files, 0.05)
    assert train and val and len(val) == round(len(files) * 0.05)
    cfg = DataConfig(max_bytes=200_000)
    tok = ByteTokenizer()
    corpora = [load_corpus(cfg, tok, split) for split in ("train", "validation")]
    assert all(c.tokens.size > 0 for c in corpora)
    assert sum(c.num_bytes for c in corpora) <= 200_000 and corpora[0].num_bytes > corpora[1].num_bytes
    assert data_fingerprint(cfg) == data_fingerprint(DataConfig(max_bytes=200_000))
    assert data_fingerprint(cfg) != data_fingerprint(DataConfig(max_bytes=100_000))


# ---------------------------------------------------------------- tokenizers
def test_fingerprint_sees_an_edit_that_keeps_the_size(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 300_000)
    (tmp_path / "b.txt").write_text("hello world")
    cfg = DataConfig(path=str(tmp_path))
    before = data_fingerprint(cfg)
    assert data_fingerprint(cfg) == before
    (tmp_path / "b.txt").write_text("hello there")  # same size, other text
    assert data_fingerprint(cfg) != before
    after_b = data_fingerprint(cfg)
    (tmp_path / "a.txt").write_text("x" * 299_999 + "y")  # the last byte of a large file
    assert data_fingerprint(cfg) != after_b


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🚀\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and tok.vocab_size == 259
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id, 9999]) == text
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut character is replaced, not raised


def sample_text() -> str:
    words = "the quick brown fox jumps over lazy dogs naïve café 日本 def return import".split()
    rng = np.random.default_rng(0)
    return "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(60))  # ~4 KB


def test_bpe_train_round_trip_save_load(tmp_path):
    texts = [sample_text()]
    tok = train_bpe(texts, 300)
    assert tok.name == "bpe" and tok.vocab_size == 300
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    text = "the lazy café fox 🚀 returns\n  x = 1"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # it learned merges
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, 10**6]) == text
    assert train_bpe(texts, 300).to_json() == tok.to_json()  # deterministic
    tok.save(tmp_path / "tok" / "tokenizer.json")
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]
    loaded = BPETokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert np.array_equal(loaded.encode(text), ids) and loaded.eos_id == tok.eos_id


def test_build_tokenizer(tmp_path):
    assert isinstance(build_tokenizer(DataConfig(), None, lambda: []), ByteTokenizer)
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=300)
    calls = []

    def texts():
        calls.append(1)
        return [sample_text()]

    first = build_tokenizer(cfg, tmp_path, texts)
    assert (tmp_path / "tokenizer.json").is_file()
    again = build_tokenizer(cfg, tmp_path, texts)  # a rerun reuses the saved file
    assert len(calls) == 1 and again.to_json() == first.to_json()
    named = build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(tmp_path / "tokenizer.json")), None, texts)
    assert np.array_equal(named.encode("fox café"), first.encode("fox café"))


def test_missing_or_corrupt_tokenizer_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=rf"^data.tokenizer_path={missing}: no such file"):
        build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(missing)), None, lambda: [])
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text("{not json")
    with pytest.raises(DataError, match=rf"^data.tokenizer_path={corrupt}: "):
        build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(corrupt)), None, lambda: [])
    with pytest.raises(DataError, match=rf"^data.tokenizer_path={corrupt}: "):  # a corrupt cached file too
        build_tokenizer(DataConfig(tokenizer="bpe"), tmp_path, lambda: [])


def test_file_names_that_are_not_utf8_split_load_and_fingerprint(tmp_path):
    """A latin-1 name (caf\\xe9.py, as a latin-1 archive unpacks) is a valid file name on Linux."""
    import os

    names = [b"caf\xe9.py", b"plain.py", b"na\xefve.py", b"z.py"]
    for i, name in enumerate(names):
        with open(os.path.join(os.fsencode(tmp_path), name), "w") as f:
            f.write(f"def f{i}():\n    return {i}\n" * 20)
    files = list_files(str(tmp_path))
    assert len(files) == 4
    train, val = split_files(files, 0.25)
    assert len(val) == 1 and sorted(train + val) == sorted(files)
    cfg = cfg_for(tmp_path, validation_fraction=0.25)
    tok = ByteTokenizer()
    assert load_corpus(cfg, tok, "train").num_bytes + load_corpus(cfg, tok, "validation").num_bytes == sum(
        f.stat().st_size for f in files)
    assert data_fingerprint(cfg) == data_fingerprint(cfg)


def test_empty_files_are_skipped_before_splitting(tmp_path):
    """0-byte files hold no text: they are never held out (nor counted) and the split has text."""
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / name).write_text(f"x = '{name}'\n" * 30)
    for i in range(6):
        (tmp_path / f"empty{i}.py").write_text("")
    files = list_files(str(tmp_path))
    assert [f.name for f in files] == ["a.py", "b.py", "c.py"]
    validation = load_corpus(cfg_for(tmp_path, validation_fraction=0.3), ByteTokenizer(), "validation")
    assert validation.num_bytes > 0


def test_a_validation_split_without_text_names_its_files_and_the_fix(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")  # a file of empty documents
    cfg = cfg_for(tmp_path, validation_fraction=0.5)
    _, held = split_files(list_files(str(tmp_path)), 0.5)
    if held[0].name == "a.jsonl":  # the hash decides which is held out: make it the empty one
        (tmp_path / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n")
        (tmp_path / "b.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    with pytest.raises(DataError) as err:
        load_corpus(cfg, ByteTokenizer(), "validation")
    message = str(err.value)
    assert message.startswith(f"data.path={tmp_path}: the validation split has no text")
    assert str(held[0]) in message and "data.validation_fraction" in message
