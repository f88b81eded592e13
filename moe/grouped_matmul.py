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
* ``tokamax``: the ``tokamax`` library's ``ragged_dot`` (``pip install 'switchyard[gpu]'``), asked
  only for implementations the installed version has registered: on CUDA and ROCm its Mosaic GPU
  kernel, else its Triton kernel where registered (tokamax 0.0.17 registers it only with
  ``jax_triton``); off the GPU its XLA reference (so that CPU tests check the call). Measured on
  Hopper (an H200); other GPUs (Blackwell included) are unmeasured. Any refusal at trace time (a
  shape, GPU, dtype or backend it does not support, whatever the exception's class; tokamax not
  installed) falls back to ``jax.lax.ragged_dot`` with one logged warning line.
* ``auto``: the program resolves it for its backend (``resolve``, called by
  ``train.core.config.for_backend``): ``megablox`` on TPU, ``tokamax`` on GPU when it is
  installed (else ``ragged_dot``), ``ragged_dot`` on CPU. Unresolved (the layer used directly),
  ``auto`` is ``ragged_dot``.

Exact weight gradient: a kernel in ``KERNELS`` (tokamax) computes only forward products, under a
``jax.custom_vjp`` of this module: ``y = kernel(x, w)`` and ``dx = kernel(dy, w^T)`` (the same
kind of grouped matmul), while ``dw`` is ``jax.lax.ragged_dot``'s own weight gradient (XLA's
ragged-contracting dot), exactly zero for an empty group and never reading rows past the last
group. No kernel's VJP is used: tokamax's weight gradient (its ragged-contracting kernel) was
measured wrong on the H200. XLA:GPU expands the ragged-contracting dot to a group-masked dense
one (about E times a dense matmul's work); what that costs on a GPU is not measured yet.

The model reads no backend: where a kernel exists for one platform only, both variants are
traced and ``jax.lax.platform_dependent`` lowers the one for the platform compiled for.

The kernels leave rows past the last group unwritten (uninitialised memory, NaN in interpret
mode); the wrapper zeroes those rows of the input and the output, so that neither the result
nor a gradient ever reads them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys

import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("auto", "ragged_dot", "megablox", "tokamax")
TOKAMAX_PREFERENCE = {True: ("mosaic_gpu", "triton"), False: ("xla",)}  # GPU variant or not: names, in order


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
        y_RN = _kernel_matmul(impl, x_RK, w_LKN, group_sizes_L)
    return jnp.where(rows_R1, y_RN, jnp.zeros((), y_RN.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_matmul(impl, x_RK, w_LKN, group_sizes_L):
    return _kernel(impl, x_RK, w_LKN, group_sizes_L)


def _kernel_matmul_fwd(impl, x_RK, w_LKN, group_sizes_L):
    return _kernel(impl, x_RK, w_LKN, group_sizes_L), (x_RK, w_LKN, group_sizes_L)


def _kernel_matmul_bwd(impl, residuals, dy_RN):
    x_RK, w_LKN, group_sizes_L = residuals
    dx_RK = _kernel(impl, dy_RN, jnp.swapaxes(w_LKN, 1, 2), group_sizes_L)
    return dx_RK, exact_weight_gradient(x_RK, dy_RN, w_LKN, group_sizes_L), None


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def exact_weight_gradient(x_RK, dy_RN, w_LKN, group_sizes_L):
    """dw[l] = x[rows of l]^T dy[rows of l]: ``jax.lax.ragged_dot``'s weight gradient (XLA's
    ragged-contracting dot), zero for an empty group, rows past the last group not read."""
    _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(x_RK, w, group_sizes_L), w_LKN)
    return vjp(dy_RN.astype(x_RK.dtype))[0]


def _kernel(impl, x_RK, w_LKN, group_sizes_L):
    """The kernel for the platform compiled for (both variants are traced)."""
    gpu = functools.partial(_kernel_or_fallback, impl, gpu=True)
    return jax.lax.platform_dependent(x_RK, w_LKN, group_sizes_L, cuda=gpu, rocm=gpu,
                                      default=functools.partial(_kernel_or_fallback, impl, gpu=False))


def _kernel_or_fallback(impl, x_RK, w_LKN, group_sizes_L, gpu: bool):
    try:
        y_RN = KERNELS[impl](x_RK, w_LKN, group_sizes_L, gpu=gpu)
    except Exception as e:  # a refusal: tokamax raises several classes (NotImplementedError, ValueError, ...)
        _warn_fallback(impl, "GPU" if gpu else "default", " ".join(f"{type(e).__name__}: {e}".split())[:400])
        return jax.lax.ragged_dot(x_RK, w_LKN, group_sizes_L)
    return y_RN.astype(x_RK.dtype)


@functools.lru_cache(maxsize=None)
def _warn_fallback(impl: str, variant: str, reason: str) -> None:
    logging.getLogger(__name__).warning("%s grouped matmul (%s variant) refused, using jax.lax.ragged_dot: %s",
                                        impl, variant, reason)


def tokamax_implementations(gpu: bool) -> tuple[str, ...]:
    """The names to ask ``tokamax.ragged_dot`` for, in order: those of ``TOKAMAX_PREFERENCE`` that
    the installed tokamax registered (``IMPLEMENTATIONS`` of the module defining ``ragged_dot``,
    0.0.12 to 0.0.17); all of them where that registry is not found (an unknown one then refuses)."""
    import tokamax

    wanted = TOKAMAX_PREFERENCE[gpu]
    registry = getattr(sys.modules.get(getattr(tokamax.ragged_dot, "__module__", "")), "IMPLEMENTATIONS", None)
    if not hasattr(registry, "__contains__"):
        return wanted
    return tuple(name for name in wanted if name in registry)


def _tokamax(x_RK, w_LKN, group_sizes_L, gpu: bool):
    """tokamax's ragged_dot, forward only; raises when every registered implementation refuses."""
    if not tokamax_available():  # a checkpoint trained with tokamax, evaluated where it is not installed
        raise ModuleNotFoundError("tokamax is not installed")
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # else tokamax parses the command line (ours) as absl flags on first use
        flags.FLAGS.mark_as_parsed()
    refusals = []
    for name in tokamax_implementations(gpu):
        try:
            return tokamax.ragged_dot(x_RK, w_LKN, group_sizes_L, preferred_element_type=x_RK.dtype,
                                      implementation=name)
        except Exception as e:  # this implementation refuses: try the next
            refusals.append(f"{name}: {type(e).__name__}: {e}")
    raise NotImplementedError("; ".join(refusals) or f"tokamax {tokamax.__version__} registers none of "
                              f"{TOKAMAX_PREFERENCE[gpu]}")


# Kernels whose forward products run under the exact-weight-gradient VJP above: impl -> (x, w, sizes, gpu) -> y
KERNELS = {"tokamax": _tokamax}


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
