"""What differs between the two stacks `make test` runs (Python 3.11 / JAX 0.10 and Python 3.12 /
JAX 0.11, tokamax), end to end: a scanned model trains through ``moe-train`` on 8 devices, with the
losses of the same model unrolled."""

import json

import pytest

from conftest import on_both_stacks, tiny_train_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("rules", on_both_stacks(["ep", "ep+tp"], "ep+tp"))
def test_a_scanned_model_trains_with_the_losses_of_the_unrolled_one(tmp_path, rules):
    """4 blocks (2 repeats of dense, MoE; grouped-query attention), 3 steps, 8 emulated devices,
    with the tensor axis too: JAX 0.11 refuses a stacked ``layers`` axis left in a scanned body's
    sharding, where 0.10 silently trimmed it."""
    from train.cli import train_main

    losses = {}
    mesh = ["--config.mesh.data=2", "--config.mesh.expert=4"] if rules == "ep" else [
        "--config.mesh.data=1", "--config.mesh.expert=4", "--config.mesh.tensor=2"]
    for scan in ("on", "off"):
        work = tmp_path / scan
        args = [*tiny_train_args(tmp_path, work, steps=3), "--config.model.num_layers=4", "--config.model.moe_every=2",
                "--config.model.num_heads=4", "--config.model.num_kv_heads=2", f"--config.model.scan_layers={scan}",
                f"--config.mesh.rules={rules}", "--config.checkpoint.every_steps=0", *mesh]
        assert train_main(args) == 0
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        losses[scan] = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses["on"]) == 3
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-6)  # XLA fuses a scanned body differently
