"""The experts' grouped matmul (moe/grouped_matmul.py): every implementation equals a per-group
loop, forward and gradients, and ``auto`` picks by platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import child_env

from moe import grouped_matmul as gm

# rows 0-9 to group 0, none to group 1, 10-29 to group 2, 30-43 to group 3; rows 44-60 are past the
# last group (R = 61 is no multiple of Megablox's row tile: the rows are padded)
pytestmark = pytest.mark.stack

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
    from train.core.config import Config, as_asked, for_backend

    cfg = Config()
    cfg.model.moe.dispatch = "dropless"
    assert for_backend(cfg, "cpu").model.moe.grouped_matmul == "ragged_dot"
    assert for_backend(cfg, "tpu").model.moe.grouped_matmul == "megablox"
    monkeypatch.setattr(gm, "tokamax_available", lambda: True)
    assert for_backend(cfg, "gpu").model.moe.grouped_matmul == "tokamax"
    assert cfg.model.moe.grouped_matmul == "auto"  # a copy: the saved config keeps "auto"
    ran = for_backend(cfg, "gpu")
    assert (ran.model.moe.grouped_matmul, ran.model.moe.ragged_exchange) == ("tokamax", True)
    saved = as_asked(ran, cfg)  # what the run saves: another backend resolves for itself
    assert (saved.model.moe.grouped_matmul, saved.model.moe.ragged_exchange) == ("auto", False)
    assert saved.model.moe.dispatch == "dropless" and ran.model.moe.grouped_matmul == "tokamax"


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
@pytest.mark.accelerator_lane
def test_the_accelerator_oracle_script_runs_on_cpu_with_a_kernel():
    """scripts/gpu_oracle.py is what a GPU or TPU session runs first; a CPU smoke run keeps it working
    (the Megablox kernel in interpret mode in the layer cases and the grouped-matmul cases)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = child_env(JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(root / "scripts" / "gpu_oracle.py"), "--kernels", "megablox",
                          "--shape", "256,128,64"], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "13/13 cases equal the oracle on cpu" in out.stdout
    assert out.stdout.splitlines()[-1] == "oracle: 13/13 passed"
    kernel_lines = [line for line in out.stdout.splitlines() if line.startswith("ok") and "megablox" in line]
    assert len(kernel_lines) == 5 and sum("y: kernel, dx: kernel, dw: megablox tgmm" in x for x in kernel_lines) == 2


# --- the kernel seam (gm.KERNELS): y and dx from the kernel, dw exact, any refusal falls back ---


@jax.custom_vjp
def _hostile(x, w, sizes):
    y = jax.lax.ragged_dot(x, w, sizes)
    return jnp.where((jnp.arange(x.shape[0]) >= jnp.sum(sizes))[:, None], jnp.nan, y)


# its own gradient: NaN for x, a non-zero weight gradient in every group (the empty ones too)
_hostile.defvjp(lambda x, w, sizes: (_hostile(x, w, sizes), (x, w)),
                lambda res, g: (jnp.full_like(res[0], jnp.nan), jnp.full_like(res[1], 1e3), None))


def hostile_kernel(x, w, sizes, gpu):
    """Right in the groups, NaN in every row past them (an unwritten output), a garbage VJP."""
    return _hostile(x, w, sizes)


def ragged_dot_reference(x, w, sizes, ct):
    """y, dx, dw of jax.lax.ragged_dot on x with the rows past the groups zeroed."""
    x = jnp.where((jnp.arange(x.shape[0]) < jnp.sum(sizes))[:, None], x, 0)

    def loss(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, sizes).astype(jnp.float32) * ct)

    return (jax.lax.ragged_dot(x, w, sizes), *jax.grad(loss, argnums=(0, 1))(x, w))


def wrapper_outputs(x, w, sizes, ct):
    def loss(x, w):
        return jnp.sum(gm.grouped_matmul(x, w, sizes, "tokamax").astype(jnp.float32) * ct)

    def outputs(x, w):
        return gm.grouped_matmul(x, w, sizes, "tokamax"), *jax.grad(loss, argnums=(0, 1))(x, w)

    return jax.jit(outputs)(x, w)


@pytest.mark.parametrize("sizes_list", [SIZES, [0, 30, 0, 31], [44, 0, 0, 0]])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_hostile_kernel_cannot_reach_the_result_or_the_gradients(monkeypatch, sizes_list, dtype):
    monkeypatch.setitem(gm.KERNELS, "tokamax", hostile_kernel)
    x, w, ct = inputs(dtype, poison=False)
    x = x.at[sum(sizes_list):].set(jnp.nan)  # NaN rows past the groups
    sizes = jnp.array(sizes_list, jnp.int32)
    y, g_x, g_w = wrapper_outputs(x, w, sizes, ct)
    ref_y, ref_gx, ref_gw = ragged_dot_reference(x, w, sizes, ct)
    assert y.dtype == g_x.dtype == g_w.dtype == dtype
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(g_w, ref_gw)  # the exact path: ragged_dot's own weight gradient
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # dx from the kernel, a product of the same values
    np.testing.assert_allclose(np.asarray(g_x, np.float32), np.asarray(ref_gx, np.float32), rtol=tol, atol=tol)
    past = sum(sizes_list)
    assert not np.any(np.asarray(y[past:])) and not np.any(np.asarray(g_x[past:]))
    for g, size in enumerate(sizes_list):
        if size == 0:
            assert not np.any(np.asarray(g_w[g])), f"empty group {g} has a weight gradient"
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in (y, g_x, g_w))


class CustomRefusal(Exception):
    pass


REFUSALS = [ValueError("Unknown implementation: triton"), NotImplementedError("Unsupported GPU architecture."),
            KeyError("mosaic"), ExceptionGroup("all implementations failed", [NotImplementedError("tile")]),
            CustomRefusal("no kernel for this dtype")]


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: type(e).__name__)
def test_a_kernel_that_refuses_falls_back_to_ragged_dot_exactly(monkeypatch, caplog, where, error):
    def refusing_kernel(x, w, sizes, gpu):
        if (where == "forward") == (x.shape[1] == K):  # the backward's call is dy [R, N] x w^T [L, N, K]
            raise error
        return jax.lax.ragged_dot(x, w, sizes)

    monkeypatch.setitem(gm.KERNELS, "tokamax", refusing_kernel)
    gm._warn_fallback.cache_clear()
    x, w, ct = inputs()
    sizes = jnp.array(SIZES, jnp.int32)
    with caplog.at_level("WARNING", logger=gm.__name__):
        got = wrapper_outputs(x, w, sizes, ct)
    for a, b in zip(got, ragged_dot_reference(x, w, sizes, ct)):
        np.testing.assert_array_equal(a, b)
    lines = [r.getMessage() for r in caplog.records if r.name == gm.__name__]
    assert lines and all("\n" not in m and type(error).__name__ in m for m in lines)
    assert len(lines) == len(set(lines)) <= 2  # one line per refusal (the GPU and the default variant)


def test_a_kernel_refusing_under_grad_inside_shard_map_falls_back(monkeypatch):
    """As moe/layer.py calls it: inside shard_map (check_vma=False), gradients through jit."""
    from jax.sharding import PartitionSpec as P

    def refusing_kernel(x, w, sizes, gpu):
        raise NotImplementedError("refused")

    monkeypatch.setitem(gm.KERNELS, "tokamax", refusing_kernel)
    x, w, ct = inputs(poison=False)
    sizes = jnp.array(SIZES, jnp.int32)
    mesh = jax.make_mesh((2,), ("expert",), devices=jax.devices()[:2])

    def loss(x, w):
        f = jax.shard_map(lambda x, w: gm.grouped_matmul(x, w, sizes, "tokamax"), mesh=mesh, in_specs=(P(), P()),
                          out_specs=P(), check_vma=False)
        return jnp.sum(f(x, w) * ct)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    for a, b in zip(got, ragged_dot_reference(x, w, sizes, ct)[1:]):
        np.testing.assert_array_equal(a, b)


def test_tokamax_is_asked_only_for_registered_implementations_and_its_gpu_variant_exports(monkeypatch):
    """The real tokamax (whichever version is installed): the CUDA variant traces and exports on
    CPU, forward and gradients, and every name asked of tokamax.ragged_dot is one it registered."""
    import functools
    import sys

    tokamax = pytest.importorskip("tokamax", reason="tokamax is not installed ('switchyard[gpu]')")
    registry = sys.modules[tokamax.ragged_dot.__module__].IMPLEMENTATIONS
    asked, original = [], tokamax.ragged_dot

    @functools.wraps(original)
    def spy(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return original(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(tokamax, "ragged_dot", spy)
    assert set(gm.tokamax_implementations(gpu=True)) <= set(registry)
    assert gm.tokamax_implementations(gpu=False) == ("xla",)
    x, w, ct = inputs(jnp.bfloat16, poison=False)
    sizes = jnp.array(SIZES, jnp.int32)

    def loss(x, w):
        return jnp.sum(gm.grouped_matmul(x, w, sizes, "tokamax").astype(jnp.float32) * ct)

    for platforms in (("cuda",), ("cpu",), ("cuda", "cpu")):
        jax.export.export(jax.jit(lambda x, w: gm.grouped_matmul(x, w, sizes, "tokamax")), platforms=platforms)(x, w)
        jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=platforms)(x, w)
    assert asked and all(isinstance(name, str) and name in registry for name in asked), asked


def test_unknown_tokamax_registry_asks_each_name_on_its_own(monkeypatch):
    """Where the registry is not found, each preferred name is asked separately (an unknown one refuses)."""
    tokamax = pytest.importorskip("tokamax", reason="tokamax is not installed ('switchyard[gpu]')")
    monkeypatch.setattr(tokamax, "ragged_dot", lambda *a, **k: (_ for _ in ()).throw(ValueError("Unknown")))
    assert gm.tokamax_implementations(gpu=True) == gm.TOKAMAX_PREFERENCE[True]
    x, w, _ = inputs(poison=False)
    sizes = jnp.array(SIZES, jnp.int32)
    np.testing.assert_array_equal(gm.grouped_matmul(x, w, sizes, "tokamax"), jax.lax.ragged_dot(x, w, sizes))
