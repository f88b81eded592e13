"""The experts' grouped matmul (moe/grouped_matmul.py): every implementation equals a per-group
loop, forward and gradients, and ``auto`` picks by platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import grouped_matmul as gm

# rows 0-9 to group 0, none to group 1, 10-29 to group 2, 30-43 to group 3; rows 44-60 are past the
# last group (R = 61 is no multiple of Megablox's row tile: the rows are padded)
SIZES = [10, 0, 20, 14]
R, K, N = 61, 24, 40


def reference(x, w, sizes):
    """y[r] = x[r] @ w[group of r]; zero past the last group."""
    y = np.zeros((x.shape[0], w.shape[-1]), np.float64)
    start = 0
    for g, size in enumerate(sizes):
        y[start:start + size] = np.asarray(x[start:start + size], np.float64) @ np.asarray(w[g], np.float64)
        start += size
    return y


def inputs(dtype=jnp.float32, poison=True):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (R, K))
    if poison:  # rows past the groups are never read: NaN there must not reach the result or a gradient
        x = x.at[sum(SIZES):].set(jnp.nan)
    w = jax.random.normal(kw, (len(SIZES), K, N))
    return x.astype(dtype), w.astype(dtype), jax.random.normal(kc, (R, N))


@pytest.mark.parametrize("impl", ["ragged_dot", "megablox", "tokamax"])
def test_each_implementation_equals_the_per_group_loop_forward_and_backward(impl):
    x, w, ct = inputs(poison=impl != "ragged_dot")  # ragged_dot multiplies NaN rows by zero weights
    sizes = jnp.array(SIZES, jnp.int32)

    def loss(x, w):
        return jnp.sum(gm.grouped_matmul(x, w, sizes, impl) * ct)

    y = jax.jit(lambda x, w: gm.grouped_matmul(x, w, sizes, impl))(x, w)
    assert y.shape == (R, N) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, reference(x, w, SIZES), rtol=1e-5, atol=1e-4)
    g_x, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    # d/dx[r] = ct[r] @ w[g]^T in the groups, 0 past them; d/dw[g] = x[g rows]^T @ ct[g rows]
    x_ok = np.where(np.arange(R)[:, None] < sum(SIZES), np.asarray(x), 0.0)
    ref_gx = np.zeros((R, K))
    ref_gw = np.zeros((len(SIZES), K, N))
    start = 0
    for g, size in enumerate(SIZES):
        rows = slice(start, start + size)
        ref_gx[rows] = np.asarray(ct[rows]) @ np.asarray(w[g]).T
        ref_gw[g] = x_ok[rows].T @ np.asarray(ct[rows])
        start += size
    np.testing.assert_allclose(g_x, ref_gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g_w, ref_gw, rtol=1e-5, atol=1e-4)
    assert np.all(np.isfinite(g_x)) and np.all(np.isfinite(g_w))


@pytest.mark.parametrize("impl", ["megablox", "tokamax"])
def test_bfloat16_stays_bfloat16_and_matches_ragged_dot(impl):
    x, w, _ = inputs(jnp.bfloat16, poison=False)
    sizes = jnp.array(SIZES, jnp.int32)
    y = gm.grouped_matmul(x, w, sizes, impl)
    ref = jax.lax.ragged_dot(x, w, sizes)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_auto_picks_by_platform(monkeypatch):
    assert gm.resolve("auto", "cpu") == "ragged_dot"
    assert gm.resolve("auto", "tpu") == "megablox"
    monkeypatch.setattr(gm, "tokamax_available", lambda: True)
    assert gm.resolve("auto", "gpu") == "tokamax"
    monkeypatch.setattr(gm, "tokamax_available", lambda: False)
    assert gm.resolve("auto", "gpu") == "ragged_dot"
    assert gm.resolve("megablox", "cpu") == "megablox"
    with pytest.raises(ValueError, match="grouped matmul 'cublas'"):
        gm.resolve("cublas", "gpu")


def test_the_program_resolves_auto_for_its_backend(monkeypatch):
    """moe/ reads no backend: train.core.config.for_backend turns "auto" into the backend's kernel."""
    from train.core.config import Config, for_backend

    cfg = Config()
    cfg.model.moe.dispatch = "dropless"
    assert for_backend(cfg, "cpu").model.moe.grouped_matmul == "ragged_dot"
    assert for_backend(cfg, "tpu").model.moe.grouped_matmul == "megablox"
    monkeypatch.setattr(gm, "tokamax_available", lambda: True)
    assert for_backend(cfg, "gpu").model.moe.grouped_matmul == "tokamax"
    assert cfg.model.moe.grouped_matmul == "auto"  # a copy: the saved config keeps "auto"


def test_megablox_tiles_are_lane_wide_or_the_whole_dimension():
    assert gm.megablox_tiling(8192, 2048, 1408) == (128, 128, 128)
    assert gm.megablox_tiling(61, 24, 40) == (64, 24, 40)


def test_tokamax_missing_falls_back_to_ragged_dot(monkeypatch):
    """A checkpoint trained with tokamax still evaluates where tokamax is not installed."""
    monkeypatch.setattr(gm, "tokamax_available", lambda: False)
    x, w, _ = inputs(poison=False)
    sizes = jnp.array(SIZES, jnp.int32)
    np.testing.assert_array_equal(gm.grouped_matmul(x, w, sizes, "tokamax"), jax.lax.ragged_dot(x, w, sizes))


@pytest.mark.slow
def test_the_accelerator_oracle_script_runs_on_cpu_with_a_kernel():
    """scripts/gpu_oracle.py is what a GPU or TPU session runs first; a CPU smoke run keeps it working
    (the Megablox kernel in interpret mode in the layer cases and the grouped-matmul cases)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(root / "scripts" / "gpu_oracle.py"), "--kernels", "megablox",
                          "--shape", "256,128,64"], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "13/13 cases equal the oracle on cpu" in out.stdout
    assert out.stdout.count("megablox") == 5 and "kernel" in out.stdout
