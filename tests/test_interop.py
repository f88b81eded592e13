"""Hugging Face import/export: exact parity with ``transformers`` for every supported architecture.

Each architecture: a tiny random model built and saved by ``transformers`` (float32, CPU), imported
with ``moe-import``'s library call, then Switchyard's logits == the reference's (max abs difference
<= 1e-4 of the logit scale), the same experts chosen in every MoE layer, and 32 greedy tokens
identical, on one device and on the 8-device mesh with the experts split; exported back, loaded with
``from_pretrained``, the logits equal the original's. One architecture is fine-tuned through the CLI
(import -> moe-train 5 steps -> moe-export -> from_pretrained).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from conftest import on_both_stacks, stack
from hf_models import TOKENS

from moe.layer import MoEFeedForward  # noqa: E402
from train.inference.evaluate import load_run  # noqa: E402
from train.inference.generate import generate  # noqa: E402
from train.interop.hf_export import export_model  # noqa: E402
from train.interop.hf_import import import_model  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_routes(run, tokens, monkeypatch):
    """(logits, {layer: [B*S, K] sorted expert ids}) of the restored Switchyard model, one jitted
    forward pass (routing runs on the global arrays, outside the layer's shard_map, so each MoE
    layer's expert ids leave the program as outputs)."""
    seen = []
    original = MoEFeedForward.route

    def route(self, *args, **kwargs):
        r = original(self, *args, **kwargs)
        seen.append(r.expert_ids.reshape(-1, r.expert_ids.shape[-1]))
        return r

    monkeypatch.setattr(MoEFeedForward, "route", route)
    with run.context():
        model = run.model()

        def forward(x):
            seen.clear()
            logits, _ = model(x)
            return logits, list(seen)

        spec = jax.P(tuple(a for a in ("data", "expert") if run.mesh.shape[a] > 1) or None)
        x = jax.device_put(jnp.asarray(tokens, jnp.int32), jax.sharding.NamedSharding(run.mesh, spec))
        logits, routes = jax.jit(forward)(x)
    monkeypatch.setattr(MoEFeedForward, "route", original)
    moe_layers = [i for i in range(run.cfg.model.num_layers) if run.cfg.model.is_moe_block(i)]
    return np.asarray(logits), {i: np.sort(np.asarray(r), axis=-1) for i, r in zip(moe_layers, routes, strict=True)}


class _Imported(dict):
    """{arch: (the reference's outputs, its folder, the imported workdir)}, each built once, when a
    test first asks for it (a lane that runs one family's tests builds only that family)."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, arch):
        base = self.tmp_path_factory.mktemp(arch)
        ref = hf_models.reference(arch, base / "hf")
        import_model(base / "hf", base / "run", log=lambda m: None)
        self[arch] = (ref, base / "hf", base / "run")
        return self[arch]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return _Imported(tmp_path_factory)


@pytest.mark.parametrize("arch", on_both_stacks(hf_models.ARCHS, "deepseek_v3"))
def test_import_parity(arch, imported, monkeypatch):
    ref, _, workdir = imported[arch]
    ref_logits, ref_ids = ref["logits"], ref["greedy"].tolist()
    ref_routes = {int(k[len("route"):]): v for k, v in ref.items() if k.startswith("route")}
    scale = np.max(np.abs(ref_logits))
    for devices in (jax.devices()[:1], jax.devices()):
        run = load_run(workdir, devices=devices)
        if len(devices) > 1:  # the experts really are split
            assert run.mesh.shape["expert"] == 8
        logits, routes = our_routes(run, TOKENS, monkeypatch)
        assert np.max(np.abs(logits - ref_logits)) <= 1e-4 * scale, (arch, len(devices))
        assert routes.keys() == ref_routes.keys()
        for i in routes:
            np.testing.assert_array_equal(routes[i], ref_routes[i], err_msg=f"{arch} layer {i}")
        if len(devices) == 1:
            with run.context():
                ids, _ = generate(run.model(), TOKENS[0, :6], 32)  # moe-generate's path (one sequence, one device)
        else:
            ids = greedy_on_mesh(run, TOKENS[0, :6], 32)
        assert ids == ref_ids, (arch, len(devices))


def greedy_on_mesh(run, prompt, n):
    """Greedy decoding with the KV cache on the run's whole mesh (the prompt in every batch row, the
    rows split over the devices, the experts over ``expert``): row 0's new tokens."""
    rows = run.mesh.devices.size
    with run.context():
        model = run.model()
        spec = jax.sharding.NamedSharding(run.mesh, jax.P(tuple(a for a in ("data", "expert") if run.mesh.shape[a] > 1)))
        cache = model.init_cache(rows, len(prompt) + n)
        step = jax.jit(lambda tokens, positions, cache: model.decode(tokens, positions, cache))
        tokens = np.tile(np.asarray(prompt, np.int32), (rows, 1))
        positions = np.tile(np.arange(len(prompt), dtype=np.int32), (rows, 1))
        out = []
        for _ in range(n):
            logits, cache = step(jax.device_put(tokens, spec), jax.device_put(positions, spec), cache)
            nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)
            out.append(int(nxt[0]))
            tokens, positions = nxt[:, None], positions[:, -1:] + 1
    return out


@pytest.mark.parametrize("arch", on_both_stacks(hf_models.ARCHS, "deepseek_v3"))
def test_export_round_trip(arch, imported, tmp_path):
    ref, _, workdir = imported[arch]
    export_model(workdir, tmp_path / "out", log=lambda m: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == arch
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 2)  # the model's own
    np.testing.assert_allclose(hf_models.hf_logits(tmp_path / "out"), ref["logits"], rtol=0, atol=1e-6)


def _cli(name, *args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", f"import sys; from train.cli import {name}; sys.exit({name}())", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_finetune_export(tmp_path):
    """moe-import -> moe-train 5 steps from it (experts split over 8 devices) -> moe-export -> from_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = hf_models.make_model("deepseek_v3", tmp_path / "hf")
    _cli("import_main", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'imported'}")
    corpus = os.path.join(ROOT, "tests", "data", "corpus")
    _cli("train_main", f"--config={tmp_path / 'imported' / 'config.json'}", f"--workdir={tmp_path / 'tuned'}",
         f"--config.train.init_from={tmp_path / 'imported'}", "--config.train.steps=5", "--config.train.batch_size=8",
         "--config.train.seq_len=32", f"--config.data.path={corpus}", "--config.mesh.data=1", "--config.mesh.expert=8",
         "--config.checkpoint.every_steps=0", "--config.eval_every_steps=0", "--config.eval_batches=1",
         "--config.optimizer.warmup_steps=1", "--config.optimizer.learning_rate=1e-3")
    log = (tmp_path / "tuned" / "log.txt").read_text() if (tmp_path / "tuned" / "log.txt").exists() else ""
    metrics = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics), log
    _cli("export_main", f"--workdir={tmp_path / 'tuned'}", f"--hf_dir={tmp_path / 'out'}")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor(TOKENS)
        tuned, original = back(x).logits.numpy(), model(x).logits.numpy()
    assert np.all(np.isfinite(tuned))
    assert np.max(np.abs(tuned - original)) > 1e-4  # it trained
    # the router's loss-free bias moved and was exported with the model
    bias = [b for n, b in back.named_buffers() if n.endswith("e_score_correction_bias")]
    ref = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert any(not torch.equal(a, b) for a, b in zip(bias, ref, strict=True))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    hf_models.reference("mixtral", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    proc = _cli("import_main", f"--hf_dir={tmp_path / 'llama'}", f"--workdir={tmp_path / 'w1'}", check=False)
    assert proc.returncode == 2 and "model_type='llama': not supported" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "w1").exists()
    # a missing tensor: rewrite the folder without one expert's weight
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, tmp_path / "hf" / "model.safetensors")
    proc = _cli("import_main", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w2'}", check=False)
    assert proc.returncode == 2 and gone in proc.stderr and "missing" in proc.stderr, proc.stderr
    assert not (tmp_path / "w2").exists() and not list(tmp_path.glob(".w2*"))
    # a misshapen one
    tensors[gone] = tensors[gone][:, :-1]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    proc = _cli("import_main", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w3'}", check=False)
    assert proc.returncode == 2 and gone in proc.stderr and "shape" in proc.stderr, proc.stderr
    assert not (tmp_path / "w3").exists()


def test_import_uses_the_models_own_special_tokens(tmp_path):
    """A tokenizer with Llama-style <unk>, <s>, </s> (and a vocabulary as large as the model's) is taken
    as it is: config.json's pad/bos/eos ids name the tokens, nothing is appended."""
    from train.data.tokenizers import build_tokenizer
    from train.interop.hf_import import plan_import

    hf_models.reference("mixtral", tmp_path / "hf")
    hf_models.make_tokenizer(tmp_path / "hf" / "tokenizer.json", specials=("<unk>", "<s>", "</s>"))
    _, cfg, _, _, tokenizer = plan_import(tmp_path / "hf")
    assert cfg.data.special_tokens == "<unk>,<s>,</s>"
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == hf_models.VOCAB - 8
    cfg.data.tokenizer_path = str(tmp_path / "hf" / "tokenizer.json")  # how a run reads it (data.special_tokens kept)
    again = build_tokenizer(cfg.data, None, lambda: iter(()))
    assert (again.eos_id, again.vocab_size) == (2, tokenizer.vocab_size)


FP8_BLOCK = (16, 16)  # the tiny model's 24- and 40-wide projections end in partial blocks


def _quantize_fp8(w: np.ndarray, block=FP8_BLOCK):
    """(F8_E4M3 weight, float32 scale per block) as DeepSeek's releases store a projection."""
    import ml_dtypes

    (rows, cols), (bh, bw) = w.shape, block
    padded = np.zeros((-(-rows // bh) * bh, -(-cols // bw) * bw), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0  # e4m3's largest value
    spread = np.repeat(np.repeat(scale, bh, axis=0), bw, axis=1)[:rows, :cols]
    return (w / spread).astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)  # e2m1's magnitudes (code + 8: negative)


def _quantize_mxfp4(w: np.ndarray):
    """(blocks, scales) as GPT-OSS's release stores an expert tensor [E, K, N]: its [E, N, K] transpose
    in groups of 32 along K, each a power-of-two scale (E8M0, bias 127) and 32 e2m1 codes, two a byte
    (the first in the low nibble)."""
    x = np.swapaxes(w, 1, 2)
    groups = x.reshape(*x.shape[:2], x.shape[2] // 32, 32)
    exponent = np.ceil(np.log2(np.maximum(np.abs(groups).max(axis=-1), 1e-30) / FP4[-1])).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.ldexp(np.float32(1), exponent)[..., None]
    codes = (np.abs(np.abs(scaled)[..., None] - FP4).argmin(axis=-1) + 8 * (scaled < 0)).astype(np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).astype(np.uint8)


def _requantized(hf_dir, tmp_path, quantize, quantization_config):
    """``hf_dir`` as a release ships it (``quantize(name, w)``: the stored tensors replacing ``name`` and
    what they mean in float32, or None to keep it; ``quantization_config`` in config.json) and the same
    weights written dequantized (what the quantized folder means): (quantized folder, dequantized
    folder, the source folder, the dequantized tensors)."""
    import shutil

    from train.interop.safetensors import SafetensorsFolder, write_shards

    src = SafetensorsFolder(hf_dir)
    quantized, plain = {}, {}
    for name in src.names():
        w = src[name]
        out = quantize(name, w)
        if out is None:
            quantized[name] = plain[name] = w
        else:
            stored, plain[name] = out
            quantized.update(stored)
    for folder, tensors in ((tmp_path / "q", quantized), (tmp_path / "deq", plain)):
        folder.mkdir()
        for f in hf_dir.iterdir():
            if f.is_file() and f.suffix not in (".safetensors", ".npz", ".npy"):
                shutil.copy(f, folder / f.name)
        write_shards(folder, [(n, a.shape, a.dtype) for n, a in tensors.items()], lambda t=tensors: t.items(), 1 << 40)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    return tmp_path / "q", tmp_path / "deq", src, plain


def _fp8_folders(hf_dir, tmp_path):
    """Every projection F8_E4M3 with block scales."""
    from train.interop.quantized import dequantize

    def quantize(name, w):
        if not (name.endswith("proj.weight") and w.ndim == 2):
            return None
        q, s = _quantize_fp8(w)
        return {name: q, name + "_scale_inv": s}, dequantize(q, s, FP8_BLOCK)

    return _requantized(hf_dir, tmp_path, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                     "weight_block_size": list(FP8_BLOCK)})


def _imports_as_dequantized(quantized, deq, tmp_path, monkeypatch):
    """Both folders imported: the same parameters bit for bit (so the same logits and experts), and
    transformers' logits on the dequantized one within the parity bound."""
    ref_logits = hf_models.hf_logits(deq)
    runs = {}
    for name, folder in (("q", quantized), ("deq", deq)):
        import_model(folder, tmp_path / f"run-{name}", log=lambda m: None)
        runs[name] = our_routes(load_run(tmp_path / f"run-{name}", devices=jax.devices()[:1]), TOKENS, monkeypatch)
    np.testing.assert_array_equal(runs["q"][0], runs["deq"][0])
    for i in runs["deq"][1]:
        np.testing.assert_array_equal(runs["q"][1][i], runs["deq"][1][i])
    assert np.max(np.abs(runs["q"][0] - ref_logits)) <= 1e-4 * np.max(np.abs(ref_logits))


def test_mxfp4_gpt_oss_imports_dequantized(imported, tmp_path, monkeypatch):
    """GPT-OSS as its releases ship it (each layer's experts MXFP4: gate_up_proj and down_proj as
    _blocks and _scales): imported, it is the same model as its weights written dequantized, and its
    logits and experts match transformers on those."""
    _, hf_dir, _ = imported["gpt_oss"]

    def quantize(name, w):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        from train.interop.quantized import dequantize_mxfp4

        blocks, scales = _quantize_mxfp4(w)
        return {name + "_blocks": blocks, name + "_scales": scales}, dequantize_mxfp4(blocks, scales)

    q, deq, src, plain = _requantized(hf_dir, tmp_path, quantize, {"quant_method": "mxfp4"})
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not np.array_equal(plain[name], src[name])  # quantizing changed the weights
    assert np.max(np.abs(plain[name] - src[name])) <= 0.25 * np.max(np.abs(src[name]))  # and kept them
    _imports_as_dequantized(q, deq, tmp_path, monkeypatch)


def test_block_scaled_fp8_deepseek_imports_dequantized(imported, tmp_path, monkeypatch):
    """DeepSeek-V3 as its releases ship it (F8_E4M3 projections, a float32 scale per block, partial
    blocks at the edges): imported, it is the same model as its weights written dequantized in
    float32, and its logits and experts match transformers on those."""
    _, hf_dir, _ = imported["deepseek_v3"]
    fp8, deq, src, plain = _fp8_folders(hf_dir, tmp_path)
    assert any(not np.array_equal(plain[n], src[n]) for n in plain)  # quantizing changed the weights
    _imports_as_dequantized(fp8, deq, tmp_path, monkeypatch)


@stack
def test_quantized_folders_the_importer_cannot_read_are_one_line(imported, tmp_path, capsys, monkeypatch):
    """Another scheme, fp8 without block scales, FP8 tensors without quantization_config, and scales
    of another block size: one line naming the field or tensor, exit 2, nothing written."""
    from test_interop_hardening import cli
    from train.cli import import_main

    _, hf_dir, _ = imported["deepseek_v3"]
    fp8, _, _, _ = _fp8_folders(hf_dir, tmp_path)
    config = json.loads((fp8 / "config.json").read_text())
    cases = [
        (dict(config, quantization_config={"quant_method": "gptq", "bits": 4}), "quant_method='gptq': not supported"),
        (dict(config, quantization_config={"quant_method": "fp8"}), "weight_block_size=None"),
        ({k: v for k, v in config.items() if k != "quantization_config"}, "needs config.json's quantization_config"),
        (dict(config, quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]}), "_scale_inv"),
    ]
    for i, (cfg, expected) in enumerate(cases):
        (fp8 / "config.json").write_text(json.dumps(cfg))
        code, err = cli(import_main, [f"--hf_dir={fp8}", f"--workdir={tmp_path / f'w{i}'}"], capsys, monkeypatch)
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)
        assert not (tmp_path / f"w{i}").exists()
