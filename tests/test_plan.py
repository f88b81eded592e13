"""``moe-train --plan``: the ahead-of-time plan equals what the real training step holds, works
for a mesh larger than the machine's devices, and says in one line when a run does not fit."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import child_env, stack

from test_train import tiny_config
from train.analysis.plan import make_plan
from train.cli import train_main
from train.core.setup import setup
from train.data.batches import eval_batches

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("params_bytes", "optimizer_bytes", "temp_bytes", "total_bytes", "flops_per_step", "compile_s", "init_compile_s",
        "eval_total_bytes", "eval_compile_s", "probe_total_bytes", "probe_compile_s", "peak_bytes", "fits")


def device0_bytes(tree) -> int:
    """Bytes the arrays of ``tree`` hold on device 0 (what was actually allocated there)."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        data = jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
        total += sum(s.data.nbytes for s in data.addressable_shards if s.device == device)
    return total


def peak(memory) -> int:
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


@stack
def test_plan_equals_what_a_real_step_holds(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.num_layers, cfg.model.scan_layers, cfg.model.remat = 4, "on", "full"
    plan = make_plan(cfg)
    run, state = setup(cfg, tmp_path / "run")
    try:
        assert plan.params_bytes == device0_bytes(state.params)
        assert plan.optimizer_bytes == device0_bytes(state.opt_state)
        assert plan.model_state_bytes == device0_bytes(state.model_state)
        with run.context():
            batch = run.global_batch(next(run.batches))
            compiled = run.programs.train_step.lower(state, batch, run.programs.stop[0]).compile()
        real = compiled.memory_analysis()
        assert plan.temp_bytes == real.temp_size_in_bytes
        assert plan.total_bytes == (real.argument_size_in_bytes + real.output_size_in_bytes
                                    - real.alias_size_in_bytes + real.temp_size_in_bytes)
        assert plan.total_bytes > plan.params_bytes + plan.optimizer_bytes
        tokens = cfg.train.batch_size * cfg.train.seq_len
        assert plan.flops_per_step > 6 * tokens * 1000  # model FLOPs: at least 6 per active parameter and token
        with run.context():  # evaluation and the router probe, as the run compiles them, on their real batches
            batch = run.global_batch(next(iter(eval_batches(run.data.validation.tokens, cfg.train.seq_len,
                                                                cfg.train.batch_size, 1))))
            evaluation = run.programs.eval_step.lower(state.params, state.model_state, batch).compile()
        assert plan.eval_total_bytes == peak(evaluation.memory_analysis())
        assert plan.probe_total_bytes == peak(run.probe.step.memory_analysis())
    finally:
        run.close()
    assert plan.fits is None
    small = make_plan(cfg, device_memory_gb=plan.total_bytes / 2**30 / 2)
    assert small.fits is False and "does not fit" in small.lines()[-1]


def test_plan_cli_prints_json_last_and_exits_0_without_a_limit(tmp_path, capsys):
    args = [f"--config={ROOT / 'configs/default.py'}", "--plan", "--config.model.num_layers=2",
            "--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.batch_size=8",
            "--config.train.seq_len=16"]
    assert train_main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert all(k in result for k in KEYS) and result["fits"] is None
    assert not (tmp_path / "run").exists()  # a plan needs and writes no workdir
    from train.cli import data_main

    assert data_main(["prepare", f"--input={ROOT / 'tests/data/corpus'}", f"--output={tmp_path / 'prep'}"]) == 0
    assert train_main([*args, f"--config.data.path={tmp_path / 'prep'}"]) == 0  # the folder's vocabulary
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params_bytes"] == result["params_bytes"]


def test_the_plan_fits_its_largest_program_which_can_be_the_evaluation(tmp_path, capsys):
    """With 8 micro-batches the step runs 1/8 of the global batch; evaluation runs all of it, and
    gives every expert a slot for every token: it is the largest program, and what must fit."""
    cfg = tiny_config(tmp_path)
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum_steps = 64, 64, 8
    cfg.model.moe.capacity_factor = 1.25  # training drops past 1.25x; evaluation never does
    plan = make_plan(cfg)
    assert plan.largest_program() == "evaluation"
    assert plan.eval_total_bytes > plan.total_bytes and plan.probe_total_bytes is not None
    assert plan.peak_bytes == plan.eval_total_bytes
    between = (plan.total_bytes + plan.eval_total_bytes) / 2 / 2**30  # the step fits, the evaluation does not
    tight = make_plan(cfg, device_memory_gb=between)
    assert tight.fits is False
    assert "the biggest part is the evaluation" in tight.lines()[-1]
    assert "model.moe.eval_capacity_factor" in tight.lines()[-1]
    assert any(line.lstrip().startswith("evaluation") for line in tight.lines())
    assert any(line.lstrip().startswith("router probe") for line in tight.lines())
    assert tight.as_json()["peak_bytes"] == plan.eval_total_bytes
    assert make_plan(cfg, device_memory_gb=plan.eval_total_bytes * 1.01 / 2**30).fits is True


@pytest.mark.slow
@stack
def test_plan_emulates_a_mesh_larger_than_the_machine_and_exits_3_when_it_does_not_fit():
    """16 emulated devices (data=4 x expert=4) in a fresh process; 1 MiB per device cannot fit."""
    cmd = [str(pathlib.Path(sys.executable).parent / "moe-train"), f"--config={ROOT / 'configs/default.py'}", "--plan", "--cpu_devices=16", "--config.mesh.data=4",
            "--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.seq_len=32",
            "--device_memory_gb=0.000001"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["devices"] == 16 and result["mesh"]["data"] == 4 and result["fits"] is False
    assert lines[-2].startswith("does not fit:") and "biggest part is" in lines[-2]
    np.testing.assert_array_less(0, [result[k] for k in KEYS[:5]])


def test_moe_import_plans_a_model_from_its_config_json_alone(tmp_path, capsys, monkeypatch):
    """A folder holding only DeepSeek-V3's config.json (YaRN, FP8 quantization_config): the parameter
    count of the model transformers builds from it, the plan's JSON last, exit 3 when one device's
    memory is too small, and bad flags in one line."""
    import hf_models
    from test_interop_hardening import cli
    from train.cli import import_main

    hf = hf_models.hf_config("deepseek_v3").to_dict()
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    plan = [f"--hf_dir={tmp_path / 'hf'}", "--plan", "--config.mesh.data=1", "--config.mesh.expert=8",
            "--config.train.batch_size=8", "--config.train.seq_len=32"]
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    capsys.readouterr()
    assert import_main(plan) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["fits"] is None and result["mesh"]["expert"] == 8 and result["params_bytes"] > 0
    ours = int(out[0].split()[1].replace(",", ""))
    code, err = cli(import_main, [*plan, "--device_memory_gb=0.000001"], capsys, monkeypatch)
    assert code == 3
    for bad, line in ((["--config.mesh.expert=8"], "--config.mesh.expert: goes with --plan"),
                      ([*plan, "--workdir=w"], "--workdir=w: --plan writes nothing"),
                      ([*plan, "--config.model.nope=1"], "config.model.nope")):
        args = bad if bad[0].startswith("--hf_dir") else [f"--hf_dir={tmp_path / 'hf'}", "--workdir=w", *bad]
        code, err = cli(import_main, args, capsys, monkeypatch)
        assert code == 2 and len(err) == 1 and line in err[0], (bad, err)
    assert not (tmp_path / "hf" / "w").exists() and sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json"]
    torch = pytest.importorskip("torch")  # (the accelerator lane has no torch)
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_models.hf_config("deepseek_v3"))
    assert ours == sum(p.numel() for p in model.parameters())
