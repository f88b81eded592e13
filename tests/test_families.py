"""The MoE families from scratch: each ``configs/<family>_tiny.py`` validates and builds, and a
DeepSeek-style model (MLA, dense first block, sigmoid group-limited routing, shared expert) and a
GPT-OSS-style one (sinks, windows, biased experts, clamped SwiGLU) train with their experts split
over 8 devices and their blocks scanned, then export to a Hugging Face model whose logits equal
Switchyard's."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import on_both_stacks, stack

from moe.costs import param_counts
from train.core.config import load_config_file, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


@stack  # (transformers' config classes)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_validate_and_infer_their_architecture(family):
    from train.interop.families import from_hf_config, infer_architecture, to_hf_config

    cfg = load_config_file(str(ROOT / f"configs/{family}_tiny.py"))
    validate(cfg, num_devices=8)
    cfg.model.vocab_size = 256
    counts = param_counts(cfg.model)
    assert counts["active"] < counts["total"]
    assert infer_architecture(cfg.model) == family
    hf = to_hf_config(family, cfg.model, "float32")
    assert hf["model_type"] == family
    # its RoPE read back as written, by us and by the family's transformers config class
    _, back = from_hf_config(hf)
    assert (back.rope_scaling, back.rope_theta) == (cfg.model.rope_scaling, cfg.model.rope_theta)
    if importlib.util.find_spec("transformers"):
        import hf_models

        rope = type(hf_models.hf_config(family)).from_dict(hf).to_dict().get("rope_parameters") or {}
        assert rope.get("rope_type", "default") == "default", rope
    # the FLOPs count the attention projections this model really has (GQA, head_dim, MLA)
    from flax import nnx

    from moe.costs import attention_shape
    from moe.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves_with_path(nnx.state(model.blocks[0].attn, nnx.Param))
    weights = sum(int(np.prod(x.shape)) for path, x in leaves if str(path[0].key).startswith("w"))
    assert attention_shape(cfg.model)[0] == weights


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tensor_map_names_exactly_the_variables_the_model_has(family):
    """A family's tensor map spells Switchyard's variable paths ("blocks/3/attn/wq"): checked here
    against the model ``moe/`` builds (unrolled, as import writes it): every parameter is mapped with
    its shape and nothing else is, and the mapped model state (router biases) exists with its shape."""
    import dataclasses

    from flax import nnx

    from moe.transformer import abstract_model
    from train.core.checkpoint import to_nested
    from train.interop.families import tensors
    from train.interop.hf_import import _leaves

    cfg = load_config_file(str(ROOT / f"configs/{family}_tiny.py")).model
    cfg = dataclasses.replace(cfg, vocab_size=256, scan_layers="off")
    model = abstract_model(cfg)

    def shapes(state) -> dict:  # as import walks its target
        return {path: tuple(x.shape) for path, x in _leaves(to_nested(state))}

    mapped = {item: {t.path: tuple(t.shape) for t in tensors(family, cfg) if t.item == item}
              for item in ("params", "model_state")}
    assert mapped["params"] == shapes(nnx.state(model, nnx.Param))
    state = shapes(nnx.state(model, nnx.Not(nnx.Param)))
    assert {path: state.get(path) for path in mapped["model_state"]} == mapped["model_state"]
    assert bool(mapped["model_state"]) == (family == "deepseek_v3")  # its routers' load-balancing biases


OPTIONAL_KEYS = ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "router_aux_loss_coef",
                 "num_key_value_heads")


@stack
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_a_config_leaves_out_take_the_family_config_classs_defaults(family):
    """A config.json without the keys that have defaults reads as the family's transformers config
    class reads it (RMSNorm epsilon, RoPE base, router loss weight, key/value heads)."""
    pytest.importorskip("transformers")
    import hf_models

    from train.interop.families import FAMILIES as REGISTRY

    hf = {k: v for k, v in hf_models.hf_config(family).to_dict().items() if k not in OPTIONAL_KEYS}
    hf["num_attention_heads"], hf["hidden_size"] = 16, 256  # room for each class's default KV heads
    theirs = type(hf_models.hf_config(family)).from_dict(hf)
    ours = REGISTRY[family].from_hf_config(hf, "config.json")
    assert ours.norm_eps == theirs.rms_norm_eps
    rope = getattr(theirs, "rope_parameters", None) or {}
    assert ours.rope_theta == rope.get("rope_theta", getattr(theirs, "rope_theta", None))
    assert ours.rope_scaling.kind == {"default": "none"}.get(rope.get("rope_type", "default"), rope.get("rope_type"))
    if ours.rope_scaling.kind == "yarn":  # GPT-OSS's class gives YaRN when config.json has no RoPE key
        assert (ours.rope_scaling.factor, ours.rope_scaling.original_max_positions, ours.rope_scaling.truncate) == (
            rope["factor"], rope["original_max_position_embeddings"], rope.get("truncate", True))
    if ours.attention != "mla":  # MLA has no key/value heads of its own
        assert ours.kv_heads == theirs.num_key_value_heads
    if hasattr(theirs, "router_aux_loss_coef"):
        assert ours.moe.aux_loss_coef == theirs.router_aux_loss_coef


@pytest.mark.parametrize("family", on_both_stacks(FAMILIES, "deepseek_v3", "gpt_oss"))
def test_family_is_layout_invariant(family):
    """GQA, QK-norm, biases, shared experts, MLA, the sigmoid router: the same logits unsharded and with
    heads/hidden split over ``tensor`` (ep+tp, fsdp+tp), experts over ``expert``, weights over ``fsdp``."""
    import sys

    from flax import nnx

    from moe.transformer import build_model
    from sharding.mesh import make_mesh
    from sharding.rules import mesh_and_rules

    sys.path.insert(0, str(ROOT / "configs"))
    from _families import tiny

    cfg = tiny(family).model
    cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.d_ff = 256, 2, 64, 128
    cfg.first_dense_layers = min(cfg.first_dense_layers, 1)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 16)))
    build = nnx.jit(lambda: build_model(cfg))  # initialised by one program (eager ops crawl on a mesh)
    ref = build()
    ref.eval()
    forward = nnx.jit(lambda model, tokens: model(tokens)[0])  # and one forward compile per layout
    want = forward(ref, tokens)
    for rules, sizes in (("ep+tp", dict(data=1, expert=2, tensor=2)), ("fsdp+tp", dict(data=1, fsdp=2, expert=1, tensor=2))):
        mesh = make_mesh(devices=jax.devices()[:4], **sizes)
        with mesh_and_rules(mesh, rules):
            model = build()
            model.eval()
            specs = [str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
            assert any("tensor" in spec for spec in specs), specs  # the layout is really in force
            batch = jax.P(tuple(a for a in ("data", "fsdp", "expert") if a in sizes))
            got = forward(model, jax.device_put(tokens, jax.sharding.NamedSharding(mesh, batch)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=f"{family} {rules}")


# (family, layers, scanned repeats, the first scanned block): DeepSeek's dense first block runs before
# the scan; GPT-OSS's pattern is a windowed and a full-attention block
FROM_SCRATCH = [("deepseek_v3", 5, 4, 1), ("gpt_oss", 4, 2, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("family, layers, repeats, first", FROM_SCRATCH, ids=[f[0] for f in FROM_SCRATCH])
def test_family_from_scratch_trains_scanned_on_8_devices_and_exports(tmp_path, family, layers, repeats, first):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work, out = tmp_path / "run", tmp_path / "hf"
    args = [f"--config={ROOT / f'configs/{family}_tiny.py'}", f"--workdir={work}", f"--config.model.num_layers={layers}",
            "--config.model.d_model=64", "--config.model.d_ff=128", "--config.model.scan_layers=on",
            "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.seq_len=32",
            f"--config.data.path={ROOT / 'tests/data/corpus'}", "--config.data.max_bytes=0", "--config.mesh.data=2",
            "--config.mesh.expert=4", "--config.checkpoint.every_steps=0", "--config.eval_every_steps=0",
            "--config.eval_batches=1"]
    run = lambda name, *a: subprocess.run(  # noqa: E731
        [sys.executable, "-c", f"import sys; from train.cli import {name}; sys.exit({name}())", *a],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    proc = run("train_main", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("export_main", f"--workdir={work}", f"--hf_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from train.inference.evaluate import load_run

    loaded = load_run(work, devices=jax.devices()[:1])
    assert loaded.cfg.model.scan_repeats == repeats and loaded.cfg.model.first_scanned == first
    tokens = np.random.RandomState(1).randint(0, 250, size=(2, 48))  # past GPT-OSS's window of 32
    with loaded.context():
        ours, _ = loaded.model()(jnp.asarray(tokens, jnp.int32))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = back(torch.tensor(tokens)).logits.numpy()
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4 * np.max(np.abs(ref))


# (file, total, active) as published: the active figures have two significant digits (3.3B, 1.3B,
# 37B), so they are met within 2%; the totals within 1%. GPT-OSS's model card counts the active
# parameters without the input embedding (a lookup, no matmul): 5.13B and 3.61B.
RELEASED = [("deepseek-v3.json", 671e9, 37e9), ("mixtral-8x7b.json", 46.7e9, 12.9e9), ("olmoe-1b-7b.json", 6.9e9, 1.3e9),
            ("qwen3-30b-a3b.json", 30.5e9, 3.3e9), ("qwen3-235b-a22b.json", 235e9, 22e9),
            ("gpt-oss-20b.json", 20.91e9, 3.61e9), ("gpt-oss-120b.json", 116.83e9, 5.13e9)]


@pytest.mark.parametrize("name,total,active", RELEASED, ids=[r[0][:-5] for r in RELEASED])
def test_released_configs_are_accepted_with_their_published_sizes(name, total, active):
    """The config.json of released checkpoints (tests/data/hf_configs: YaRN and FP8 for DeepSeek-V3)
    import without a refusal, validate as a run, and count the published parameters."""
    import json

    from train.core.config import Config
    from train.interop.families import from_hf_config

    path = ROOT / "tests/data/hf_configs" / name
    _, model = from_hf_config(json.loads(path.read_text()), where=str(path))
    validate(Config(model=model), num_devices=8)
    counts = param_counts(model)
    if name.startswith("gpt-oss"):
        counts["active"] -= model.vocab_size * model.d_model
    assert abs(counts["total"] / total - 1) < 0.01, counts
    assert abs(counts["active"] / active - 1) < 0.02, counts


GPT_OSS_REFUSED = [  # a GPT-OSS config.json edited -> what its one line names
    (dict(attention_bias=False), "attention_bias=False"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types=["),
    (dict(layer_types=["chunked_attention"] * 24), "layer_types=["),
    (dict(layer_types=["full_attention", "sliding_attention"] * 12), "full attention every n-th layer only"),
    (dict(sliding_window=0), "sliding_window=0: a positive integer needed"),
]


@pytest.mark.parametrize("edit, message", GPT_OSS_REFUSED, ids=[m.split("=")[0] for _, m in GPT_OSS_REFUSED])
def test_gpt_oss_settings_it_cannot_compute_are_one_line(edit, message):
    import json

    from train.interop.families import InteropError, from_hf_config

    hf = json.loads((ROOT / "tests/data/hf_configs/gpt-oss-20b.json").read_text()) | edit
    with pytest.raises(InteropError) as err:
        from_hf_config(hf, "config.json")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith("config.json: ")
