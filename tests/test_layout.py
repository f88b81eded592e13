"""Checkpoints written before the restructuring (layout v1, a flat model config) still evaluate,
generate and resume, with the numbers that version computed from them."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import child_env

from moe import layout
from train.core.config import Config, apply_override, from_dict, upgrade
from train.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "v1_workdir"
# expected.json was computed on another processor: XLA:CPU promises the same bits only on the same
# machine (vector width and FMA contraction differ between CPUs), so a stored value is compared to
# float rounding. Two CPUs differed by 5e-9 relative; a wrong layout or router moves a
# loss by far more than 1e-6. Comparisons between two runs inside one test stay bit-exact.
STORED_RTOL = 1e-6
V1_ARGS = [
    "--config=configs/default.py", "--cpu_devices=1", "--config.mesh.data=1", "--config.mesh.expert=1",
    "--config.model.num_layers=2", "--config.model.d_model=16", "--config.model.num_heads=2",
    "--config.model.d_ff=32", "--config.model.moe_every=1", "--config.model.moe.num_experts=4",
    "--config.model.moe.router=loss_free", "--config.model.moe.router_jitter=0.1",
    "--config.model.moe.router_options.loss_free.gamma=0.01", "--config.train.batch_size=8", "--config.train.seq_len=16",
    "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=1", "--config.data.path=tests/data/corpus",
    "--config.data.validation_fraction=0.25", "--config.eval_batches=1", "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
]


def test_layouts_map_both_ways_wherever_an_ffn_sits():
    v2 = {"blocks": {"0": {"ffn": {"wi": 1, "wo": 2, "router": {"w": 3, "bias": 4, "rngs": {"key": 5, "count": 6}}},
                           "attn": {"wq": 7}},
                     "1": {"ffn": {"wi": 8, "wo": 9}}},  # a dense block
          "mu": {"blocks": {"0": {"ffn": {"router": {"w": 10}}}}}}
    v1 = layout.to_v1(v2)
    assert v1["blocks"]["0"]["ffn"] == {"wi": 1, "wo": 2, "router_w": 3, "expert_bias": 4, "rngs": {"key": 5, "count": 6}}
    assert v1["mu"]["blocks"]["0"]["ffn"] == {"router_w": 10} and v1["blocks"]["1"] == v2["blocks"]["1"]
    assert layout.to_v2(v1) == v2
    target, back = layout.legacy(v2, layout.paths(v1))
    assert target == v1 and back(v1) == v2
    same, identity = layout.legacy(v2, layout.paths(v2))
    assert same is v2 and identity(v1) is v1


def test_an_old_flat_config_reads_into_the_moe_section():
    saved = json.loads((V1 / "config.json").read_text())
    assert saved["model"]["router"] == "loss_free" and "moe" not in saved["model"]
    cfg = from_dict(saved)
    assert cfg.model.moe.router == "loss_free" and cfg.model.moe.num_experts == 4
    assert cfg.model.moe.router_jitter == 0.1 and cfg.model.d_model == 16
    assert upgrade(saved)["model"]["moe"]["router_options"]["loss_free"]["gamma"] == 0.01
    assert cfg.model.moe.router_options.loss_free.gamma == 0.01 and cfg.model.moe.router_options.hash.seed == saved["model"]["hash_seed"]


def test_a_config_saved_with_flat_router_options_reads_into_each_routers_section():
    """Before routers owned their options, ``model.moe`` held them flat; a seed or a bias step some
    routers shared goes to each of theirs, and the command line names the new key of an old one."""
    saved = {"model": {"moe": {"router": "stable", "hash_seed": 3, "stable_freeze_step": 7, "stable_balance": 0.0,
                               "stable_gate": "softmax", "loss_free_gamma": 0.05, "gshard_threshold": 0.5,
                               "thor_consistency": 0.25, "num_groups": 2, "topk_groups": 2, "routed_scaling": 2.5}}}
    options = from_dict(saved).model.moe.router_options
    assert (options.stable.seed, options.stable.freeze_step, options.stable.balance, options.stable.gate) == (3, 7, 0.0, "softmax")
    assert options.hash.seed == options.balanced_hash.seed == options.bigram_hash.seed == 3
    assert options.loss_free.gamma == options.sigmoid.gamma == 0.05 and options.gshard.threshold == 0.5
    assert (options.sigmoid.num_groups, options.sigmoid.topk_groups, options.sigmoid.routed_scaling) == (2, 2, 2.5)
    assert options.thor.consistency == 0.25
    assert from_dict(Config().to_dict()) == Config()  # today's layout reads back as it was
    with pytest.raises(ConfigError, match=r"config.model.moe.stable_gate: unknown key; it is "
                                          r"config.model.moe.router_options.stable.gate now"):
        apply_override(Config(), "model.moe.stable_gate", "one")
    with pytest.raises(AttributeError, match=r"it is router_options.balanced_hash.seed and .* and router_options.stable.seed now"):
        Config().model.moe.hash_seed = 1


@pytest.mark.slow
def test_a_v1_checkpoint_evaluates_generates_and_resumes_as_that_version_did(tmp_path, capsys):
    from train.cli import eval_main, generate_main

    expected = json.loads((V1 / "expected.json").read_text())
    work = tmp_path / "v1"
    shutil.copytree(V1, work)
    assert eval_main([f"--workdir={work}"]) == 0  # on 8 devices, as the old version scored it
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["loss"] == pytest.approx(expected["eval_loss_step4"], rel=STORED_RTOL)
    assert generate_main([f"--workdir={work}", "--prompt=def ", "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "train", *V1_ARGS, f"--workdir={work}", "--config.train.steps=6"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"resumed from {work / 'checkpoints' / '4'}" in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in rows if r["split"] == "train"}
    assert losses == pytest.approx(expected["resumed_losses"], rel=STORED_RTOL)
