"""Checkpoints: round trip, bit-exact resume, restore on other meshes, eval and generation."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import child_env, on_both_stacks, stack

from test_train import tiny_config
from train.cli import eval_main, generate_main
from train.errors import ConfigError
from train.inference.evaluate import evaluate_run, load_run
from reference import generate_without_cache
from train.core import loop
from train.core.setup import setup
from train.inference.generate import generate


def host(tree):
    """NumPy copies of every array (PRNG keys as their raw key data)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def train(cfg, workdir, stop_at=None, devices=None):
    run, state = setup(cfg, workdir, devices=devices)
    try:
        state, _ = loop.train(run, state, stop_at=stop_at)
        state = host(state)
        data_state = run.batches.get_state()
    finally:
        run.close()
    return state, data_state


def train_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for r in rows:
        if r["split"] == "train":
            out[r["step"]] = r["loss"]  # a resumed run re-logs steps: the later row wins
    return out


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """A 6-step run straight, and the same run stopped after 3 and re-run to 6 (random router)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp)
    cfg.model.moe.router = "random"  # its RNG stream is part of the saved state
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.eval_batches = 6, 2, 1
    straight, _ = train(cfg, tmp / "straight")
    stopped, stopped_data = train(cfg, tmp / "split", stop_at=3)
    resumed, resumed_data = train(cfg, tmp / "split")
    return dict(cfg=cfg, tmp=tmp, straight=straight, stopped=stopped, stopped_data=stopped_data,
                resumed=resumed, resumed_data=resumed_data)


@stack
def test_resume_is_bit_exact(resumed_runs):
    r = resumed_runs
    straight, split = train_losses(r["tmp"] / "straight"), train_losses(r["tmp"] / "split")
    assert list(split) == [1, 2, 3, 4, 5, 6]
    assert split == straight  # identical floats, step by step
    assert_trees_equal(r["resumed"].params, r["straight"].params)
    assert_trees_equal(r["resumed"].opt_state, r["straight"].opt_state)
    assert r["stopped_data"]["next_batch"] == 3 and r["resumed_data"]["next_batch"] == 6
    steps = sorted(int(p.name) for p in (r["tmp"] / "split" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and 3 in steps


@stack
def test_round_trip_restores_the_whole_state(resumed_runs):
    r = resumed_runs
    run, state = setup(r["cfg"], r["tmp"] / "straight")  # finds step 6 and restores it
    try:
        state = host(state)
        assert int(state.step) == 6
        assert_trees_equal(state, r["straight"])  # params, optimizer state, RNG streams, step
        assert run.batches.get_state()["next_batch"] == 6
    finally:
        run.close()


@pytest.mark.parametrize("mesh", on_both_stacks([dict(data=1, expert=8), dict(data=1, expert=1)], dict(data=1, expert=8)),
                         ids=["expert8", "1device"])
def test_restore_onto_another_mesh_and_continue(resumed_runs, tmp_path, mesh):
    """Saved on data=2 x expert=4; restored on expert=8 or on one device, step 4 matches."""
    r = resumed_runs
    work = tmp_path / "w"
    shutil.copytree(r["tmp"] / "split", work)
    for step in (4, 5, 6):
        shutil.rmtree(work / "checkpoints" / str(step), ignore_errors=True)
    cfg = tiny_config(r["tmp"], **mesh)
    cfg.model.moe.router = "random"
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.eval_batches = 6, 2, 1
    devices = jax.devices()[: mesh["data"] * mesh["expert"]]
    run, state = setup(cfg, work, devices=devices)
    try:
        assert int(state.step) == 3
        assert_trees_equal(host(state), r["stopped"])  # params, optimizer state, RNG streams
        with run.context():
            batch = run.global_batch(next(run.batches))
            state, metrics = run.train_step(state, batch)
        assert float(metrics["loss"]) == pytest.approx(train_losses(r["tmp"] / "straight")[4], rel=1e-5)
    finally:
        run.close()


def test_incompatible_config_is_refused_and_extending_steps_is_allowed(resumed_runs, tmp_path):
    r = resumed_runs
    work = tmp_path / "w"
    shutil.copytree(r["tmp"] / "straight", work)
    cfg = tiny_config(r["tmp"])
    cfg.model.moe.router = "random"
    cfg.model.d_model = 64
    with pytest.raises(ConfigError, match=r"^config\.model\.d_model=64: differs from the checkpoint"):
        setup(cfg, work)
    cfg.model.d_model = 32
    cfg.data.validation_fraction = 0.5  # other data
    with pytest.raises(ConfigError, match=r"^config\.data: the data differ"):
        setup(cfg, work)
    cfg.data.validation_fraction = 0.25
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.checkpoint.keep, cfg.eval_batches = 7, 2, 2, 1
    state, _ = train(cfg, work)
    assert int(state.step) == 7
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [6, 7]  # checkpoint.keep=2


@stack
def test_params_only_restore_never_reads_the_optimizer_state(resumed_runs, tmp_path):
    r = resumed_runs
    work = tmp_path / "w"
    shutil.copytree(r["tmp"] / "straight", work)
    shutil.rmtree(work / "checkpoints" / "6" / "opt_state")  # gone: a params-only restore must not care
    run = load_run(work)
    assert run.step == 6
    assert_trees_equal(host(run.params), r["straight"].params)


@stack
def test_eval_gives_the_same_loss_on_1_and_8_devices(resumed_runs):
    work = resumed_runs["tmp"] / "straight"
    one = evaluate_run(load_run(work, devices=jax.devices()[:1]), log=lambda m: None)
    eight = evaluate_run(load_run(work), log=lambda m: None)
    assert one["tokens"] == eight["tokens"] > 0
    assert one["loss"] == pytest.approx(eight["loss"], abs=1e-4)
    assert one["perplexity"] == pytest.approx(np.exp(one["loss"]), rel=1e-6)


def test_moe_eval_and_moe_generate_cli(resumed_runs, capsys):
    work = str(resumed_runs["tmp"] / "straight")
    assert eval_main([f"--workdir={work}", "--step=4"]) == 0
    captured = capsys.readouterr()
    assert "scored 37/37 batches" in captured.err  # progress, then the JSON line on stdout
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["step"] == 4 and set(out) >= {"loss", "perplexity", "bits_per_byte", "tokens"}
    one_file = resumed_runs["tmp"] / "corpus" / "f0.py"
    assert eval_main([f"--workdir={work}", f"--data_path={one_file}"]) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["step"] == 6 and other["tokens"] == len(one_file.read_bytes())  # every byte scored once
    argv = [f"--workdir={work}", "--prompt=def add", "--max_new_tokens=8"]
    assert generate_main(argv) == 0
    first = capsys.readouterr().out
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("def add")  # greedy is deterministic
    with pytest.raises(SystemExit):
        eval_main([f"--workdir={work}", "--step=5"])
    assert "--step=5: not among the checkpoints" in capsys.readouterr().err


def test_eval_and_generate_read_a_workdir_a_run_holds_and_bad_generation_flags_get_one_line(resumed_runs, capsys,
                                                                                           monkeypatch):
    from train.services.workdir import RunFolder

    work = str(resumed_runs["tmp"] / "straight")
    held = RunFolder(work).open()  # as a training run on it would: readers are still welcome
    try:
        assert eval_main([f"--workdir={work}", "--max_batches=1"]) == 0
        assert generate_main([f"--workdir={work}", "--prompt=def add", "--max_new_tokens=2"]) == 0
        capsys.readouterr()
        for flag, message in [("--top_k=1000", "--top_k=1000: more than the 259 tokens of the vocabulary"),
                              ("--temperature=nan", "--temperature=nan: must be a finite number >= 0"),
                              ("--temperature=inf", "--temperature=inf: must be a finite number >= 0")]:
            with pytest.raises(SystemExit) as exc:
                generate_main([f"--workdir={work}", "--prompt=def add", flag])
            err = capsys.readouterr().err.strip()
            assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
        monkeypatch.setattr("train.services.memory.device_memory", lambda devices: (1 << 20, "a 1 MiB device"))
        with pytest.raises(SystemExit) as exc:  # a KV cache the device cannot hold is refused before it is allocated
            generate_main([f"--workdir={work}", "--prompt=def add", "--max_new_tokens=4000"])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1, err
        assert "--max_new_tokens=4000: the KV cache of 4007 positions needs" in err and "new tokens fit" in err, err
        monkeypatch.undo()
        assert generate_main([f"--workdir={work}", "--prompt=def add", "--max_new_tokens=20"]) == 0
        err = capsys.readouterr().err  # trained on 16 positions: the 27 asked for go past them
        assert "reach position 27, past the 16 positions the model was trained on (train.seq_len)" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        held.release()


def test_kv_cache_generation_equals_recomputing_the_prefix(resumed_runs):
    run = load_run(resumed_runs["tmp"] / "straight", devices=jax.devices()[:1])
    with run.context():
        model = run.model()
        prompt = [10, 20, 30, 40, 50]
        cached, cached_logits = generate(model, prompt, 6)
        full, full_logits = generate_without_cache(model, prompt, 6)
        again, _ = generate(model, prompt, 6)
        sampled_a, _ = generate(model, prompt, 6, temperature=1.0, top_k=5, seed=3)
        sampled_b, _ = generate(model, prompt, 6, temperature=1.0, top_k=5, seed=3)
    assert cached == full == again
    np.testing.assert_allclose(cached_logits, full_logits, rtol=1e-4, atol=1e-4)
    assert sampled_a == sampled_b


@stack
def test_a_plain_orbax_reader_can_list_and_restore_the_checkpoint_on_one_device(resumed_runs):
    """Saved on 8 devices; read back on 1 by plain Orbax (the README's recipe), without this project."""
    path = resumed_runs["tmp"] / "straight" / "checkpoints"
    code = f"""
import sys, jax, orbax.checkpoint as ocp
mgr = ocp.CheckpointManager({str(path)!r})
step = max(mgr.all_steps())
ckptr = ocp.StandardCheckpointer()
meta = ckptr.metadata({str(path)!r} + f"/{{step}}/params")
one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta.item_metadata)
params = ckptr.restore({str(path)!r} + f"/{{step}}/params", target)
meta = ocp.CheckpointManager({str(path)!r}, item_names=("meta",)).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
assert not any(m.split(".")[0] in ("moe", "train", "sharding") for m in sys.modules)
print(step, jax.device_count(), float(abs(params["embed"]).sum()), meta["config"]["model"]["d_model"])
"""
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    step, devices, total, d_model = proc.stdout.split()
    assert (step, devices, d_model) == ("6", "1", "32")
    assert float(total) == pytest.approx(float(np.abs(np.asarray(resumed_runs["straight"].params["embed"])).sum()), rel=1e-6)


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's aborted reads
def test_eval_and_generate_fall_back_from_an_unreadable_checkpoint_without_renaming_it(resumed_runs, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(resumed_runs["tmp"] / "straight", work)
    ckpts = work / "checkpoints"
    victim = _largest_file(ckpts / "6" / "params")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated
    names = sorted(p.name for p in ckpts.iterdir())
    fallback = f"checkpoint 6 at {ckpts / '6'} cannot be read ("
    assert eval_main([f"--workdir={work}", "--max_batches=1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 4
    said = [line for line in captured.err.splitlines() if "cannot be read" in line]
    assert len(said) == 1 and said[0].startswith(f"moe-eval: {fallback}") and "trying an older one" in said[0], said
    assert generate_main([f"--workdir={work}", "--prompt=def add", "--max_new_tokens=2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add") and f"moe-generate: {fallback}" in captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    with pytest.raises(SystemExit) as exc:  # the step asked for is unreadable: no fallback
        eval_main([f"--workdir={work}", "--step=6"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith(f"moe-eval: --step=6: {fallback}") and len(err.splitlines()) == 1, err
    (ckpts / "4" / "meta" / "metadata").unlink()  # missing files
    (ckpts / "2" / "params" / "manifest.ocdbt").unlink()
    with pytest.raises(SystemExit) as exc:
        generate_main([f"--workdir={work}", "--prompt=def add", "--max_new_tokens=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err[-1] == f"moe-generate: {ckpts}: no checkpoint can be read (steps 2, 4, 6)", err
    assert len(err) == 4 and not any("Traceback" in line for line in err)
    assert sorted(p.name for p in ckpts.iterdir()) == names  # read-only: nothing renamed
