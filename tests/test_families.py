"""The MoE families from scratch: each ``configs/<family>_tiny.py`` validates and builds, and a
DeepSeek-style model (MLA, dense first block, sigmoid group-limited routing, shared expert) trains
with its experts split over 8 devices and its blocks scanned, then exports to a Hugging Face model
whose logits equal Switchyard's."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.costs import param_counts
from train.core.config import load_config_file, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_validate_and_infer_their_architecture(family):
    from train.interop.archs import infer_architecture, to_hf_config

    cfg = load_config_file(str(ROOT / f"configs/{family}_tiny.py"))
    validate(cfg, num_devices=8)
    cfg.model.vocab_size = 256
    counts = param_counts(cfg.model)
    assert counts["active"] < counts["total"]
    assert infer_architecture(cfg.model) == family
    assert to_hf_config(family, cfg.model, "float32")["model_type"] == family


@pytest.mark.slow
def test_deepseek_from_scratch_trains_scanned_on_8_devices_and_exports(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work, out = tmp_path / "run", tmp_path / "hf"
    args = [f"--config={ROOT / 'configs/deepseek_v3_tiny.py'}", f"--workdir={work}", "--config.model.num_layers=5",
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
    assert loaded.cfg.model.scan_repeats == 4 and loaded.cfg.model.first_scanned == 1
    tokens = np.random.RandomState(1).randint(0, 250, size=(2, 16))
    with loaded.context():
        ours, _ = loaded.model()(jnp.asarray(tokens, jnp.int32))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = back(torch.tensor(tokens)).logits.numpy()
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4 * np.max(np.abs(ref))
