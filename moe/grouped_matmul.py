"""One grouped matmul for the experts, with the implementation picked by platform.

``grouped_matmul(x_RK, w_LKN, group_sizes_L)`` computes rows [start_l, start_l + size_l) of
``x`` times ``w[l]``, ``jax.lax.ragged_dot``'s contract: rows past the last group come out zero,
and gradients flow to ``x`` and ``w``. Implementations (``GROUPED_MATMULS``):

* ``ragged_dot``: ``jax.lax.ragged_dot``. Runs everywhere. XLA:CPU and XLA:GPU lower it to a
  masked dense matmul (every group's weights against every row), which is what the CPU runs.
* ``megablox``: the Megablox grouped matmul (``jax.experimental.pallas.ops.tpu.megablox``, a
  Pallas TPU kernel with its own VJP: ``gmm`` forward and for the input gradient, ``tgmm`` for
  the weight gradient). On TPU the kernel; elsewhere the same kernel in Pallas interpret mode
  (slow; it exists so that CPU tests check the kernel's tiling and group bookkeeping).
* ``tokamax``: the ``tokamax`` library's ``ragged_dot`` (``pip install 'switchyard[gpu]'``). On
  NVIDIA GPUs its Mosaic GPU kernel (Hopper and Blackwell), else its Triton kernel; a shape or
  GPU that neither supports falls back to ``jax.lax.ragged_dot``. Off the GPU, tokamax's own
  reference implementation (so that CPU tests check the call and its gradients).
  Where tokamax is not installed (a checkpoint evaluated on another machine), ``ragged_dot``
  with a warning; training refuses the setting there.
* ``auto``: the program resolves it for its backend (``resolve``, called by
  ``train.core.config.for_backend``): ``megablox`` on TPU, ``tokamax`` on GPU when it is
  installed (else ``ragged_dot``), ``ragged_dot`` on CPU. Unresolved (the layer used directly),
  ``auto`` is ``ragged_dot``.

The model reads no backend: where a kernel exists for one platform only, both variants are
traced and ``jax.lax.platform_dependent`` lowers the one for the platform compiled for.

The kernels leave rows past the last group unwritten (uninitialised memory, NaN in interpret
mode); the wrapper zeroes those rows of the input and the output, so that neither the result
nor a gradient ever reads them.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("auto", "ragged_dot", "megablox", "tokamax")


def tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def _checked(impl: str) -> str:
    if impl not in GROUPED_MATMULS:
        raise ValueError(f"grouped matmul {impl!r}: choose one of {', '.join(GROUPED_MATMULS)}")
    return impl


def resolve(impl: str, platform: str) -> str:
    """The implementation ``impl`` means on ``platform`` (a JAX backend name: cpu, gpu, tpu)."""
    if _checked(impl) != "auto":
        return impl
    if platform == "tpu":
        return "megablox"
    if platform in ("gpu", "cuda", "rocm") and tokamax_available():
        return "tokamax"
    return "ragged_dot"


def grouped_matmul(x_RK: jax.Array, w_LKN: jax.Array, group_sizes_L: jax.Array, impl: str = "auto") -> jax.Array:
    """[R, K] x [L, K, N] -> [R, N] in ``x``'s dtype (float32 accumulation in the kernels)."""
    group_sizes_L = group_sizes_L.astype(jnp.int32)
    if _checked(impl) in ("auto", "ragged_dot"):
        return jax.lax.ragged_dot(x_RK, w_LKN, group_sizes_L)
    rows_R1 = (jnp.arange(x_RK.shape[0]) < jnp.sum(group_sizes_L))[:, None]
    x_RK = jnp.where(rows_R1, x_RK, jnp.zeros((), x_RK.dtype))
    w_LKN = w_LKN.astype(x_RK.dtype)
    if impl == "megablox":
        y_RN = jax.lax.platform_dependent(x_RK, w_LKN, group_sizes_L, tpu=functools.partial(_megablox, interpret=False),
                                          default=functools.partial(_megablox, interpret=True))
    else:
        y_RN = jax.lax.platform_dependent(x_RK, w_LKN, group_sizes_L, cuda=functools.partial(_tokamax, gpu=True),
                                          rocm=functools.partial(_tokamax, gpu=True), default=_tokamax)
    return jnp.where(rows_R1, y_RN, jnp.zeros((), y_RN.dtype))


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn): 128 (the TPU's lane width) or the whole dimension when it is smaller; tm is
    a multiple of 8 (the rows are padded to a multiple of it)."""
    tm = min(128, -(-m // 8) * 8)
    return tm, min(128, k), min(128, n)


def _megablox(x_RK, w_LKN, group_sizes_L, interpret: bool):
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    r, k = x_RK.shape
    tm, tk, tn = megablox_tiling(r, k, w_LKN.shape[-1])
    pad = -r % tm
    if pad:
        x_RK = jnp.pad(x_RK, ((0, pad), (0, 0)))
    y = gmm(x_RK, w_LKN, group_sizes_L, preferred_element_type=x_RK.dtype, tiling=(tm, tk, tn),
            interpret=interpret)
    return y[:r]


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    import logging

    logging.getLogger(__name__).warning("tokamax grouped matmul unavailable here (%s); using jax.lax.ragged_dot", reason)


def _fallback(reason: str, x_RK, w_LKN, group_sizes_L):
    _warn_fallback(reason)
    return jax.lax.ragged_dot(x_RK, w_LKN, group_sizes_L)


def _tokamax(x_RK, w_LKN, group_sizes_L, gpu: bool = False):
    if not tokamax_available():  # a checkpoint trained with tokamax, evaluated where it is not installed
        return _fallback("not installed", x_RK, w_LKN, group_sizes_L)
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # else tokamax parses the command line (ours) as absl flags on first use
        flags.FLAGS.mark_as_parsed()
    if not gpu:
        return tokamax.ragged_dot(x_RK, w_LKN, group_sizes_L, preferred_element_type=x_RK.dtype, implementation="xla")
    try:
        return tokamax.ragged_dot(x_RK, w_LKN, group_sizes_L, preferred_element_type=x_RK.dtype,
                                  implementation=("mosaic", "triton"))
    except (NotImplementedError, ExceptionGroup) as e:
        return _fallback(f"{type(e).__name__}: {str(e)[:200]}", x_RK, w_LKN, group_sizes_L)
