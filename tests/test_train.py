"""End-to-end training on tiny configs: steps, sharding rules, data, accumulation, CLI."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layer import MoEFeedForward
from moe.transformer import DenseFFN, Transformer
from sharding import make_mesh
from train.cli import train_main
from train.core.config import Config, load_config_file
from reference import sharding_table
from train.core import loop
from train.core.setup import setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 60


def tiny_config(tmp_path, **mesh) -> Config:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "corpus" / f"f{i}.py").write_text(TEXT.replace("add", f"add{i}"))
    cfg = Config()
    m = cfg.model
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 2, 32, 4, 64
    m.moe_every, m.moe.num_experts, m.moe.experts_per_token = 1, 8, 2
    m.moe.capacity_factor = 8.0  # no drops: results must not depend on the mesh
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 4, 8, 16
    cfg.optimizer.warmup_steps = 1
    cfg.data.path = str(tmp_path / "corpus")
    cfg.data.validation_fraction = 0.25
    cfg.log_every_steps, cfg.eval_every_steps, cfg.eval_batches = 1, 0, 2
    cfg.mesh.data, cfg.mesh.expert = mesh.get("data", 2), mesh.get("expert", 4)
    cfg.mesh.fsdp, cfg.mesh.tensor = mesh.get("fsdp", 1), mesh.get("tensor", 1)
    cfg.mesh.rules = mesh.get("rules", "ep")
    return cfg


def run_steps(cfg, workdir, n, repeat_batch=False, devices=None):
    """n train steps; returns per-step losses and the final parameters (NumPy)."""
    run, state = setup(cfg, workdir, devices=devices)
    losses = []
    with run.context():
        batch = run.global_batch(next(run.batches))
        for _ in range(n):
            if not repeat_batch:
                batch = run.global_batch(next(run.batches))
            with jax.transfer_guard("disallow"):  # an accidental host <-> device copy fails loudly
                state, metrics = run.train_step(state, batch)
            losses.append(float(metrics["loss"]))
        params = jax.tree.map(np.asarray, state.params)
    run.close()
    return losses, params, metrics


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.optimizer.learning_rate = 1e-2
    losses, _, metrics = run_steps(cfg, tmp_path / "run", 6, repeat_batch=True)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5
    for key in ("grad_norm", "learning_rate", "moe/aux_loss", "moe/z_loss", "moe/dropped_fraction", "moe/router_entropy"):
        assert np.isfinite(float(metrics[key])), key
    assert metrics["moe/expert_load"].shape == (8,)
    assert float(jnp.sum(metrics["moe/expert_load"])) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_train_step_is_layout_invariant_across_meshes_and_rules(tmp_path):
    """Two steps on 1 device equal two steps under every sharding preset on 8 devices."""
    ref_cfg = tiny_config(tmp_path, data=1, expert=1)
    ref_cfg.model.moe.capacity_group_size = 16  # fixed capacity groups: identical drops everywhere
    ref_cfg.model.moe.capacity_factor = 1.0
    ref_losses, ref_params, _ = run_steps(ref_cfg, tmp_path / "ref", 2, devices=jax.devices()[:1])
    for mesh in (dict(data=2, expert=4), dict(data=2, fsdp=2, expert=2, rules="fsdp"),
                 dict(data=1, expert=4, tensor=2, rules="ep+tp"), dict(data=2, expert=4, rules="dp"),
                 dict(data=1, fsdp=2, expert=2, tensor=2, rules="fsdp+tp")):
        cfg = tiny_config(tmp_path, **mesh)
        cfg.model.moe.capacity_group_size, cfg.model.moe.capacity_factor = 16, 1.0
        losses, params, _ = run_steps(cfg, tmp_path / "run", 2)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(mesh))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(mesh))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.batch_size = 16  # two micro-batches of 8 sequences, each over the 8 devices
    cfg.model.moe.aux_loss_coef = 0.0  # the load-balance loss is not additive over micro-batches
    one, p1, _ = run_steps(cfg, tmp_path / "a", 2)
    cfg.train.grad_accum_steps = 2
    two, p2, _ = run_steps(cfg, tmp_path / "b", 2)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_dense_baseline_shares_the_model_code(tmp_path):
    dense = load_config_file(str(ROOT / "configs/dense_baseline.py"))
    moe = load_config_file(str(ROOT / "configs/default.py"))
    dense.model.vocab_size = moe.model.vocab_size = 320
    d = nnx.eval_shape(lambda: Transformer(dense.model, rngs=nnx.Rngs(0)))
    m = nnx.eval_shape(lambda: Transformer(moe.model, rngs=nnx.Rngs(0)))
    assert all(isinstance(b.ffn, DenseFFN) for b in d.blocks)
    assert [isinstance(b.ffn, MoEFeedForward) for b in m.blocks] == [False, True, False, True]
    assert type(d) is type(m) and d.num_moe_layers == 0 and m.num_moe_layers == 2


# The golden sharding table of configs/default.py (mesh data=2 x expert=4, rules "ep").
GOLDEN_DEFAULT = {
    "embed": (None, None), "final_norm/scale": (None,),
    **{f"blocks/{i}/{n}": (None, None, None) for i in range(4) for n in ("attn/wq", "attn/wk", "attn/wv", "attn/wo")},
    **{f"blocks/{i}/{n}/scale": (None,) for i in range(4) for n in ("attn_norm", "ffn_norm")},
    **{f"blocks/{i}/ffn/{n}": (None, None) for i in (0, 2) for n in ("wi", "wg", "wo")},
    **{f"blocks/{i}/ffn/{n}": ("expert", None, None) for i in (1, 3) for n in ("wi", "wg", "wo")},
    **{f"blocks/{i}/ffn/router/{n}": (None, None) for i in (1, 3) for n in ("w", "distill")},  # router "stable"
}


def test_golden_sharding_table_of_the_default_config():
    cfg = load_config_file(str(ROOT / "configs/default.py"))
    cfg.model.vocab_size = 320
    table = sharding_table(cfg.model, make_mesh(data=2, expert=4), "ep")
    assert table == GOLDEN_DEFAULT


def test_sharding_presets_place_weights_as_documented():
    cfg = load_config_file(str(ROOT / "configs/default.py"))
    cfg.model.vocab_size = 320
    fsdp = sharding_table(cfg.model, make_mesh(data=2, fsdp=2, expert=2), "fsdp")
    assert fsdp["blocks/0/ffn/wi"] == ("fsdp", None) and fsdp["blocks/1/ffn/wi"] == ("expert", "fsdp", None)
    assert fsdp["embed"] == (None, "fsdp")
    tp = sharding_table(cfg.model, make_mesh(data=1, expert=4, tensor=2), "ep+tp")
    assert tp["blocks/1/ffn/wi"] == ("expert", None, "tensor") and tp["blocks/0/attn/wq"] == (None, "tensor", None)
    assert tp["embed"] == ("tensor", None)
    both = sharding_table(cfg.model, make_mesh(data=1, fsdp=2, expert=2, tensor=2), "fsdp+tp")
    assert both["blocks/1/ffn/wi"] == ("expert", "fsdp", "tensor") and both["blocks/0/ffn/wi"] == ("fsdp", "tensor")
    dp = sharding_table(cfg.model, make_mesh(data=2, expert=4), "dp")
    assert dp["blocks/1/ffn/wi"] == (None, None, None)


def test_moe_train_cli_end_to_end(tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path)
    workdir = tmp_path / "cli"
    argv = ["--config", str(ROOT / "configs/default.py"), f"--workdir={workdir}",
            "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.seq_len=16",
            f"--config.data.path={cfg.data.path}", "--config.data.validation_fraction", "0.25",
            "--config.log_every_steps=1", "--config.eval_every_steps=2", "--config.eval_batches=1",
            "--config.checkpoint.every_steps=0"]
    assert train_main(argv) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for row in train_rows:  # every row has every field; the compiling first step has no rate yet
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu", "moe/aux_loss", "moe/z_loss",
                    "moe/dropped_fraction", "moe/expert_load", "moe/router_entropy"):
            assert key in row, (row["step"], key)
    assert train_rows[0]["tokens_per_sec"] is None and train_rows[-1]["tokens_per_sec"] > 0 and train_rows[-1]["mfu"] > 0
    assert len(train_rows[-1]["moe/expert_load"]) == 8
    # per-layer telemetry: default config, 2 layers, MoE in every second block -> block 1 only
    last = train_rows[-1]
    assert len(last["moe/layer1/expert_load"]) == 8 and "moe/layer0/expert_load" not in last
    assert last["moe/layer1/dropped_fraction"] == pytest.approx(last["moe/dropped_fraction"])
    assert last["moe/layer1/load_imbalance"] == pytest.approx(8 * max(last["moe/layer1/expert_load"]), rel=1e-5)
    assert last["moe/load_imbalance"] == pytest.approx(last["moe/layer1/load_imbalance"])
    assert last["moe/layer1/router_entropy"] == pytest.approx(last["moe/router_entropy"])
    # router health: H(expert | token) at every logged step, churn from the second; and the last
    # row's value is the routing of the saved parameters on the first validation batch
    assert "moe/churn" not in train_rows[0] and all(0 <= r["moe/layer1/churn"] <= 1 for r in train_rows[1:])
    assert all(0 < r["moe/layer1/token_entropy"] <= np.log(8) for r in train_rows)
    from train.services.telemetry import token_entropy
    from train.data.batches import eval_batches
    from train.data.prepared import open_eval_data
    from train.inference.evaluate import load_run

    run = load_run(workdir)
    _, corpus = open_eval_data(run.cfg.data, workdir, None)
    probe = next(iter(eval_batches(corpus.tokens, 16, 8, 1)))
    with run.context():
        model = run.model()
        routes = jax.jit(lambda m, t: m.routes(t))(model, jnp.asarray(probe["inputs"]))
    assert token_entropy(np.asarray(routes["layer1"]), probe["inputs"], 8) == pytest.approx(
        last["moe/layer1/token_entropy"], abs=1e-9)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all(np.isfinite(r["loss"]) for r in evals)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["model"]["vocab_size"] == 320
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert "done: loss" in capsys.readouterr().out
    assert not [r.getMessage() for r in caplog.records if r.levelno >= 30]  # a normal run warns about nothing


def test_dry_run_prints_config_and_parameter_counts(tmp_path, capsys):
    assert train_main(["--config", str(ROOT / "configs/default.py"), f"--workdir={tmp_path}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "3,850,368 total, 1,097,856 active per token" in out  # router "stable": its distilled table too
    assert not (tmp_path / "metrics.jsonl").exists()
    assert train_main(["--config", str(ROOT / "configs/dense_baseline.py"), f"--workdir={tmp_path}", "--dry_run"]) == 0
    # equal active parameters but for the MoE model's routers (2 MoE blocks x d_model 128 x 8 experts)
    assert f"{1_092_736 - 2 * 128 * 8:,} total, {1_092_736 - 2 * 128 * 8:,} active per token" in capsys.readouterr().out
    assert train_main(["--config", str(ROOT / "configs/default.py"), f"--workdir={tmp_path}", "--dry_run",
                       "--config.data.tokenizer=bpe"]) == 0
    assert "active per token (vocabulary 2048 from data.bpe_vocab_size" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_")))
def test_every_shipped_config_loads_and_validates_on_8_devices(name):
    from train.core.config import validate, validate_mesh

    cfg = load_config_file(str(ROOT / "configs" / f"{name}.py"))
    validate(cfg)
    sizes = validate_mesh(cfg, 8)
    assert sizes["data"] * sizes["fsdp"] * sizes["expert"] * sizes["tensor"] == 8
    doc = (ROOT / "configs" / f"{name}.py").read_text()
    assert "moe-train --config=configs/" in doc or "make train" in doc  # the docstring gives the command


def test_bfloat16_activations_with_a_trained_bpe_tokenizer(tmp_path, capsys):
    """bf16 activations (f32 params and router) train; the BPE is trained, saved and reused."""
    from train.cli import eval_main, generate_main

    cfg = tiny_config(tmp_path)
    cfg.model.dtype = "bfloat16"
    cfg.data.tokenizer, cfg.data.bpe_vocab_size = "bpe", 320
    cfg.optimizer.learning_rate = 1e-2
    losses, params, _ = run_steps(cfg, tmp_path / "w", 6, repeat_batch=True)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))  # master weights stay float32
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (tmp_path / "w" / "tokenizer.json").is_file() and saved["model"]["vocab_size"] == 320
    run, state = setup(cfg, tmp_path / "w")  # the saved tokenizer is loaded, not retrained
    try:
        state, _ = loop.train(run, state)
    finally:
        run.close()
    assert eval_main([f"--workdir={tmp_path / 'w'}"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert generate_main([f"--workdir={tmp_path / 'w'}", "--prompt=def add", "--max_new_tokens=5"]) == 0
    assert capsys.readouterr().out.startswith("def add")


def test_untied_output_projection_trains(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.tie_embeddings = False
    cfg.optimizer.learning_rate = 1e-2
    losses, params, _ = run_steps(cfg, tmp_path / "w", 4, repeat_batch=True)
    assert "unembed" in params and params["unembed"].shape == (32, 320)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_profile_steps_traces_steps_after_warm_up(tmp_path, monkeypatch):
    """--config.profile_steps=2 writes a jax.profiler trace of steps 2-3 (step 1 compiles) under WORKDIR/profile."""
    import gzip

    from conftest import tiny_train_args
    from train.services.metrics import MetricsWriter

    logged, log = [], MetricsWriter.log  # the console lines (its stream was bound before capture started)
    monkeypatch.setattr(MetricsWriter, "log", lambda self, message: (logged.append(message), log(self, message))[1])
    workdir = tmp_path / "w"
    assert train_main([*tiny_train_args(tmp_path, workdir, steps=4), "--config.profile_steps=2"]) == 0
    sessions = list((workdir / "profile" / "plugins" / "profile").iterdir())
    assert len(sessions) == 1, sessions
    xplanes = list(sessions[0].glob("*.xplane.pb"))
    assert xplanes, list(sessions[0].iterdir())  # XProf / TensorBoard
    # the traced program carries the MoE layer's stages as op names (XProf groups ops by them);
    # under autodiff a scope reads jvp(route) in the forward pass and transpose(jvp(...)) in the backward
    xplane = xplanes[0].read_bytes()
    for stage in ("route", "permute", "exchange", "experts", "exchange_back", "unpermute"):
        assert re.search(rb"jit\(train_step\)/[^\x00]*[/(]" + stage.encode() + rb"[/)]", xplane), stage
    trace = json.loads(gzip.decompress((sessions[0] / "perfetto_trace.json.gz").read_bytes()))  # Perfetto
    steps = sorted(int(e["args"]["step_num"]) for e in trace["traceEvents"] if e.get("name") == "train" and "args" in e)
    assert steps == [2, 3], steps  # exactly the two steps after the compiling one
    lines = [line for line in logged if line.startswith("profile:")]
    assert len(lines) == 1 and "steps 2-3" in lines[0] and str(sessions[0]) in lines[0], lines
    assert json.loads((workdir / "summary.json").read_text())["profile"] == str(sessions[0])


def test_profiler_stops_its_trace_when_the_loop_ends_early(tmp_path):
    """An error (or SIGTERM's early return) inside the traced window still stops the trace."""
    from train.services.profiler import StepProfiler

    logged = []
    f = jax.jit(lambda x: x * 2)
    x = f(jnp.ones(4))
    off = StepProfiler(tmp_path / "off", 2, enabled=False, log=logged.append)  # processes other than 0
    off.maybe_start(2, warm=True, previous=x)
    assert not off.active and not (tmp_path / "off").exists()
    prof = StepProfiler(tmp_path / "profile", 5, enabled=True, log=logged.append)
    with pytest.raises(ZeroDivisionError):
        try:
            for step in (1, 2, 3):
                prof.maybe_start(step, warm=step > 1, previous=x)
                with prof.annotate(step):
                    x = f(x)
                prof.step_done(x)
                if step == 3:
                    raise ZeroDivisionError
        finally:
            prof.finish()
    assert not prof.active and list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(logged) == 1 and logged[0].startswith("profile: steps 2-3 traced to "), logged
    jax.profiler.start_trace(tmp_path / "again")  # no trace was left running
    jax.profiler.stop_trace()


def test_bfloat16_activations_track_float32_with_float32_master_weights(tmp_path):
    """The same seed and batches in float32 and bfloat16: bf16 losses are finite and within 2% of
    float32; parameters and optimizer state stay float32; the matmuls really run in bf16 while the
    router, the logits and the loss stay float32."""
    import re

    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(tmp_path)
        cfg.model.dtype = dtype
        run, state = setup(cfg, tmp_path / dtype)
        losses = []
        with run.context():
            for i in range(5):
                batch = run.global_batch(next(run.batches))
                if i == 0:
                    hlo = run.programs.train_step.lower(state, batch, run.programs.stop[0]).as_text()
                state, metrics = run.train_step(state, batch)
                losses.append(float(metrics["loss"]))
            floats = {str(x.dtype) for x in jax.tree.leaves((state.params, state.opt_state))
                      if jnp.issubdtype(x.dtype, jnp.floating)}
        run.close()
        bf16_dots = re.findall(r"stablehlo\.dot_general[^\n]*-> tensor<[^>]*xbf16>", hlo)
        runs[dtype] = dict(losses=np.array(losses), floats=floats, bf16_dots=len(bf16_dots), hlo=hlo)
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert "bf16" not in f32["hlo"]
    assert f32["floats"] == bf16["floats"] == {"float32"}  # master weights and Adam moments
    assert bf16["bf16_dots"] >= 10, bf16["bf16_dots"]  # attention, dense FFN and expert matmuls
    assert np.all(np.isfinite(bf16["losses"]))
    np.testing.assert_allclose(bf16["losses"], f32["losses"], rtol=2e-2)

    # Where each dtype lives, on one device: bf16 residual stream, float32 router and logits.
    cfg = tiny_config(tmp_path)
    cfg.model.dtype, cfg.model.vocab_size = "bfloat16", 320
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    x = jax.eval_shape(model.embed_tokens, tokens)
    h = jax.eval_shape(lambda t: model.blocks[0](model.embed_tokens(t), positions, t)[0], tokens)
    route = jax.eval_shape(lambda t: model.blocks[0].ffn.route(model.embed_tokens(t), t), tokens)
    logits, aux = jax.eval_shape(model, tokens)
    assert x.dtype == h.dtype == jnp.bfloat16
    assert route.gates.dtype == jnp.float32 and logits.dtype == jnp.float32 and aux.router_loss.dtype == jnp.float32


def test_dropless_training_equals_capacity_training_that_never_drops(tmp_path):
    """model.dispatch='dropless' through the whole train step: with a capacity factor that would
    drop most assignments it drops none, and trains exactly like capacity dispatch with room
    for every assignment."""
    roomy = tiny_config(tmp_path)  # capacity_factor 8: nothing dropped
    losses_ref, params_ref, m_ref = run_steps(roomy, tmp_path / "capacity", 2)
    dropless = tiny_config(tmp_path)
    dropless.model.moe.dispatch, dropless.model.moe.capacity_factor = "dropless", 0.25
    losses, params, m = run_steps(dropless, tmp_path / "dropless", 2)
    assert float(m["moe/dropped_fraction"]) == 0.0 == float(m_ref["moe/dropped_fraction"])
    # CPU resolved grouped_matmul="auto" to ragged_dot for the run; what the run saves keeps "auto"
    saved = json.loads((tmp_path / "dropless" / "config.json").read_text())["model"]["moe"]
    assert (saved["grouped_matmul"], saved["ragged_exchange"]) == ("auto", False)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    assert jax.tree.structure(params) == jax.tree.structure(params_ref)
    for (path, a), b in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_per_layer_router_telemetry_sums_to_the_router_loss_and_averages_to_the_statistics(tmp_path):
    cfg = tiny_config(tmp_path)  # 2 layers, MoE in both, top-2 learned router
    cfg.model.vocab_size, cfg.model.moe.capacity_factor = 64, 0.5
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    _, aux = model(tokens)
    layers = aux.per_layer
    assert sorted(layers) == ["layer0", "layer1"]
    for stats in layers.values():
        load = np.asarray(stats.expert_load)
        assert load.shape == (8,) and load.sum() == pytest.approx(1.0, abs=1e-6)
        assert float(stats.load_imbalance) == pytest.approx(8 * load.max(), rel=1e-6)
    for key in ("dropped_fraction", "router_entropy", "load_imbalance"):
        mean = np.mean([float(getattr(v, key)) for v in layers.values()])
        assert float(getattr(aux, key)) == pytest.approx(mean, rel=1e-6), key
    # router losses add up over the layers (Switch, GShard): each layer's coefficient applies in full
    for key in ("aux_loss", "z_loss"):
        assert float(getattr(aux, key)) == pytest.approx(sum(float(getattr(v, key)) for v in layers.values()), rel=1e-6), key
        assert all(float(getattr(v, key)) > 0 for v in layers.values())
    assert float(aux.router_loss) == pytest.approx(float(aux.aux_loss) + float(aux.z_loss), rel=1e-6)
    # the two layers' routers are different parameters: their loads are not the same numbers
    assert not np.allclose(layers["layer0"].expert_load, layers["layer1"].expert_load)
    assert float(aux.dropped_fraction) > 0  # capacity 0.5 drops: the statistic is exercised

