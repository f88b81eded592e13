"""moe-import / moe-export refuse hostile input in one line (exit 2; an unreadable checkpoint: exit 1),
before anything is compiled or written, and close the round trip of a byte-tokenizer run.

Every hostile folder starts from a tiny valid mixtral folder (``hf_models.reference``) and is edited
here: a safetensors header that lies (an integer dtype for a float tensor, offsets past the end of a
truncated file, a span that is not the shape's bytes, overlapping tensors, an unknown dtype, a header
length of 2^62, a header that is not JSON or not an object), a ``config.json`` that is a list or not
JSON, tensors the config does not use, an empty file as a folder, destinations that cannot be created.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest

import hf_models
from conftest import tiny_train_args

from train.cli import export_main, import_main, train_main
from train.interop.guards import ignored
from train.interop.hf_export import export_model
from train.interop.hf_import import import_model, plan_import

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
WEIGHT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
OTHER = "model.layers.1.block_sparse_moe.experts.4.w2.weight"  # the same shape


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral") / "hf"
    hf_models.reference("mixtral", folder)
    return folder


@pytest.fixture(scope="module")
def imported(mixtral, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imported") / "run"
    import_model(mixtral, workdir, log=lambda m: None)
    return workdir


def cli(main, argv, capsys, monkeypatch) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a command line run in this process."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CLI sets its device count
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def rewrite_header(file: pathlib.Path, edit) -> None:
    """Rewrite ``file``'s JSON header as ``edit(header)`` returns it (the data bytes kept)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    blob = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def entry(name, **change):
    def edit(header):
        header[name].update(change)
        return header
    return edit


def overlap(header):
    header[OTHER]["data_offsets"] = header[WEIGHT]["data_offsets"]
    return header


def raw_header(text: bytes, length: int | None = None):
    def make(file: pathlib.Path) -> None:
        data = file.read_bytes()
        file.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data[8:])
    return make


def truncate(file: pathlib.Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def config_json(text: str):
    def make(file: pathlib.Path) -> None:
        (file.parent / "config.json").write_text(text)
    return make


def fewer_layers(file: pathlib.Path) -> None:
    cfg = json.loads((file.parent / "config.json").read_text())
    (file.parent / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))


HOSTILE = {  # how the folder's model.safetensors (or the folder) is broken -> what the one line says
    "int_dtype": (lambda f: rewrite_header(f, entry(WEIGHT, dtype="I32")), f"tensor {WEIGHT} has dtype I32"),
    "truncated": (truncate, "are not a range inside the file's"),
    "lying_span": (lambda f: rewrite_header(f, entry(WEIGHT, shape=[32, 47])), "but F32 [32, 47] is"),
    "overlap": (lambda f: rewrite_header(f, overlap), "overlap"),
    "unknown_dtype": (lambda f: rewrite_header(f, entry(WEIGHT, dtype="Q7")), "dtype 'Q7' is not supported"),
    "header_2_62": (raw_header(b"{}", 1 << 62), f"header length {1 << 62} exceeds the file"),
    "header_not_json": (raw_header(b"{not json"), "the header is not JSON"),
    "header_a_list": (raw_header(b"[1, 2]  "), "the header is a JSON list, not an object"),
    "config_a_list": (config_json("[1, 2]"), "config.json: a JSON list, not an object"),
    "config_not_json": (config_json("{nope"), "config.json: not valid JSON"),
    "unused_layer": (fewer_layers, "tensor(s) not used by config.json (mixtral, num_hidden_layers=2): "
                                   "model.layers.2."),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_folder_is_one_line_exit_2_and_writes_nothing(case, mixtral, tmp_path, capsys, monkeypatch):
    """Each of these was accepted (integers cast to floats, extra layers dropped) or a traceback
    (cannot reshape, KeyError, MemoryError, AttributeError) before."""
    folder = tmp_path / "hf"
    shutil.copytree(mixtral, folder)
    make, message = HOSTILE[case]
    make(folder / "model.safetensors")
    code, err = cli(import_main, [f"--hf_dir={folder}", f"--workdir={tmp_path / 'w'}"], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".w*"))


def test_unused_tensors_import_with_allow_unused_and_ignored_ones_are_accepted(mixtral, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "hf"
    shutil.copytree(mixtral, folder)
    fewer_layers(folder / "model.safetensors")
    code, err = cli(import_main, [f"--hf_dir={folder}", f"--workdir={tmp_path / 'w'}", "--allow_unused"],
                    capsys, monkeypatch)
    assert code == 0, err
    assert any("not imported: model.layers.2." in line for line in err), err
    assert json.loads((tmp_path / "w" / "config.json").read_text())["model"]["num_layers"] == 2
    # the buffers transformers recomputes, and DeepSeek's multi-token-prediction layers, are no error
    shutil.copytree(mixtral, tmp_path / "hf2")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "hf2" / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, tmp_path / "hf2" / "model.safetensors")
    plan_import(tmp_path / "hf2")
    deepseek = {"model_type": "deepseek_v3", "num_hidden_layers": 3, "num_nextn_predict_layers": 1}
    assert ignored("model.layers.3.eh_proj.weight", deepseek)
    assert not ignored("model.layers.4.eh_proj.weight", deepseek)
    assert not ignored("model.layers.3.eh_proj.weight", dict(deepseek, model_type="mixtral"))


def test_bad_folders_and_destinations(mixtral, imported, tmp_path, capsys, monkeypatch):
    """An empty file as --hf_dir, and destinations under /proc, under a regular file or a URL, for both commands."""
    (tmp_path / "a_file").write_text("")
    cases = [
        (import_main, [f"--hf_dir={tmp_path / 'a_file'}", f"--workdir={tmp_path / 'w'}"], "a_file: not a directory"),
        (export_main, [f"--workdir={imported}", f"--hf_dir={tmp_path / 'a_file'}"], "exists and is not a directory"),
        (import_main, [f"--hf_dir={mixtral}", "--workdir=/proc/switchyard/w"],
         "--workdir=/proc/switchyard/w: cannot be created"),
        (export_main, [f"--workdir={imported}", "--hf_dir=/proc/switchyard/out"],
         "--hf_dir=/proc/switchyard/out: cannot be created"),
        (export_main, [f"--workdir={imported}", "--hf_dir=gs://bucket/out"], "--hf_dir=gs://bucket/out: URLs are not"),
        (import_main, [f"--hf_dir={mixtral}", f"--workdir={tmp_path / 'a_file' / 'w'}"], "a_file is not a directory"),
        (export_main, [f"--workdir={imported}", f"--hf_dir={tmp_path / 'a_file' / 'o'}"], "a_file is not a directory"),
    ]
    for main, argv, message in cases:
        code, err = cli(main, argv, capsys, monkeypatch)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and (tmp_path / "a_file").read_text() == ""
    assert not pathlib.Path("/proc/switchyard").exists()


def test_relative_paths_and_unreadable_checkpoints(mixtral, tmp_path, capsys, monkeypatch):
    """Relative --hf_dir/--workdir work both ways; an export of a checkpoint with truncated data or
    without its _METADATA names the step folder as unreadable (exit 1, as moe-eval), writing nothing."""
    shutil.copytree(mixtral, tmp_path / "hf" / "mix")
    monkeypatch.chdir(tmp_path)
    code, err = cli(import_main, ["--hf_dir=hf/mix", "--workdir=w/imp"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "w" / "imp" / "checkpoints" / "0").is_dir(), err
    code, err = cli(export_main, ["--workdir=w/imp", "--hf_dir=out/mix"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "out" / "mix" / "model.safetensors").is_file(), err
    for broken, damage in (("truncated", truncate_arrays), ("no_metadata", lambda p: (p / "_METADATA").unlink())):
        shutil.copytree(tmp_path / "w" / "imp", tmp_path / broken)
        damage(tmp_path / broken / "checkpoints" / "0" / "params")
        step = tmp_path / broken / "checkpoints" / "0"
        code, err = cli(export_main, [f"--workdir={broken}", "--hf_dir=x", "--step=0"], capsys, monkeypatch)
        assert code == 1 and len(err) == 1 and f"checkpoint 0 at {step} cannot be read (" in err[0], (broken, err)
        code, err = cli(export_main, [f"--workdir={broken}", "--hf_dir=x"], capsys, monkeypatch)  # the latest
        assert code == 1 and f"checkpoint 0 at {step} cannot be read (" in err[0], (broken, err)
        assert "no checkpoint can be read" in err[-1] and not any("Traceback" in line for line in err), err
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def truncate_arrays(params: pathlib.Path) -> None:
    """Cut every array data file of a saved item to a third (OCDBT: ``ocdbt.process_*/d/*``)."""
    files = [f for f in params.glob("ocdbt.process_*/d/*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_byte_tokenizer_run_exports_and_imports_back(tmp_path):
    """A 2-step byte-tokenizer mixtral run, exported and imported: the tokenizer gives the byte
    tokenizer's ids and the parameters are equal."""
    from train.data.tokenizers import BPETokenizer, ByteTokenizer
    from train.inference.evaluate import load_run

    work = tmp_path / "run"
    args = [a for a in tiny_train_args(tmp_path, work, 2) if not a.startswith("--config=")]
    args += [f"--config={ROOT / 'configs/mixtral_tiny.py'}", "--config.data.tokenizer=byte",
             "--config.model.moe.expert_d_ff=64", "--config.data.max_bytes=0"]
    assert train_main(args) == 0
    export_model(work, tmp_path / "hf", log=lambda m: None)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    import_model(tmp_path / "hf", tmp_path / "back", log=lambda m: None)
    tokenizer = BPETokenizer.load(tmp_path / "back" / "tokenizer.json")
    byte = ByteTokenizer()
    for text in ("def f(x):\n    return x", "héllo wörld 😀 <eos> <pad>", "\x00\x7f\t\r\n  "):
        np.testing.assert_array_equal(tokenizer.encode(text), byte.encode(text))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (byte.pad_id, byte.bos_id, byte.eos_id)
    devices = jax.devices()[:1]
    ours = load_run(work, devices=devices, scan_layers="off")
    back = load_run(tmp_path / "back", devices=devices, scan_layers="off")
    assert back.cfg.data.special_tokens == "<pad>,<bos>,<eos>"
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), ours.params, back.params)
    assert all(jax.tree.leaves(same)) and jax.tree.leaves(same)


@pytest.mark.parametrize("flag, line", [
    ("--step=-3", "moe-export: --step=-3: must be >= 0 and <= 2147483647"),
    ("--max_shard_gb=inf", "moe-export: --max_shard_gb=inf: must be a finite number > 0 and <= 1048576"),
])
def test_export_flags_out_of_range_are_one_line(tmp_path, flag, line, capsys):
    from train.cli import export_main

    with pytest.raises(SystemExit) as exc:
        export_main([f"--workdir={tmp_path}", f"--hf_dir={tmp_path / 'out'}", flag])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == line
