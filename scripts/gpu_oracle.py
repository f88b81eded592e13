"""The MoE layer against the naive oracle (tests/oracle.py) on one accelerator, forward and gradients.

The test suite pins everything to 8 emulated CPU devices; this runs the single-device cases of
the same oracle check on whatever JAX's default backend is (a GPU here), so the accelerator's
kernels (sorting, gathers, the batched expert matmuls, the grouped matmul of dropless dispatch
through every implementation this platform has: ``ragged_dot``, and ``tokamax`` on GPU or
``megablox`` on TPU) are checked against the reference. Float32 matmuls run at full precision (no
TF32) for the check. Then the grouped matmul alone at the 1B config's widths (d=2048, expert
d_ff=1408, 8192 rows, E=8 and 64, bf16, uneven groups with an empty one), forward and gradients
against ``jax.lax.ragged_dot`` in float32 (and the empty group's weight gradient exactly zero); the
line says what computed each: the kernel or the wrapper's ``ragged_dot`` fallback (tokamax refuses
some shapes and GPUs) for y and dx, and for dw the wrapper's exact path (XLA's ragged-contracting
dot) or Megablox's ``tgmm``. Every case prints one line (``ok`` or ``FAIL`` with the error); the
last line is ``oracle: N/M passed``.

    JAX_PLATFORMS=cuda python scripts/gpu_oracle.py
    JAX_PLATFORMS=cpu python scripts/gpu_oracle.py --kernels megablox --shape 256,128,64  # CPU smoke run

One device cannot exercise the all-to-all over the ``expert`` axis; the CPU suite covers that.
Exits 1 if any case differs from the oracle.
"""

import argparse
import os
import pathlib
import sys
import traceback

root = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "tests"), str(root)]
os.environ.setdefault("JAX_PLATFORMS", "cuda")  # conftest (imported by the harness) keeps a set value

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from test_moe_oracle import check_against_oracle  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe.grouped_matmul import grouped_matmul, tokamax_available  # noqa: E402
from harness import E, layer_spec  # noqa: E402

CASES = [  # (mesh, router, k, dispatch, capacity factor)
    ("1dev", "topk", 1, "capacity", 0.5),
    ("1dev", "topk", 2, "capacity", float(E)),
    ("none", "hash", 2, "capacity", 0.5),
    ("1dev", "random", 1, "capacity", 1.0),
    ("1dev", "gshard", 2, "capacity", 1.0),
    ("1dev", "topk", 1, "dropless", 0.5),
    ("none", "topk", 2, "dropless", 0.5),
    ("1dev", "hash", 2, "dropless", 0.5),
]


def kernels() -> list[str]:
    """The grouped-matmul implementations besides ragged_dot that this platform runs natively."""
    platform = jax.default_backend()
    if platform == "tpu":
        return ["megablox"]
    return ["tokamax"] if platform == "gpu" and tokamax_available() else []


def grouped_matmul_case(impl: str, experts: int, rows=8192, d=2048, f=1408) -> str:
    """One grouped matmul at training widths against ragged_dot in float32: (max error of the output
    and of both gradients, relative to the largest reference value; the path of each)."""
    kx, kw, kc, kg = jax.random.split(jax.random.key(experts), 4)
    x = jax.random.normal(kx, (rows, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (experts, d, f)) / d**0.5).astype(jnp.bfloat16)
    ct = jax.random.normal(kc, (rows, f), jnp.bfloat16)
    share = jax.random.dirichlet(kg, jnp.ones(experts)).at[1].set(0.0)  # uneven, expert 1 empty
    sizes = jnp.floor(share / share.sum() * (rows - 100)).astype(jnp.int32)  # the last ~100 rows in no group

    def run(impl, dtype):
        def loss(x, w):
            return jnp.sum(grouped_matmul(x.astype(dtype), w.astype(dtype), sizes, impl).astype(jnp.float32) * ct)

        fwd = jax.jit(lambda x, w: grouped_matmul(x.astype(dtype), w.astype(dtype), sizes, impl))
        return fwd(x, w).astype(jnp.float32), *jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    got, ref = run(impl, jnp.bfloat16), run("ragged_dot", jnp.float32)
    errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r))) for g, r in zip(got, ref)]
    empty_dw = float(jnp.max(jnp.abs(got[2][1].astype(jnp.float32))))
    paths = matmul_paths(impl, x, w, ct, sizes)
    if max(errs) > 2e-2 or empty_dw != 0 or not all(bool(jnp.all(jnp.isfinite(g))) for g in got):
        raise AssertionError(f"relative errors (y, dx, dw) {np.round(errs, 4).tolist()}, "
                             f"empty group's dw max {empty_dw}; {paths}")
    return f"relative errors (y, dx, dw) {np.round(errs, 4).tolist()}, empty group's dw 0; {paths}"


def matmul_paths(impl: str, x, w, ct, sizes) -> str:
    """What computed y, dx and dw: y and dx ("kernel" or "ragged_dot fallback") from the lowering
    for this platform (dx is the backward's grouped matmul of dy with w transposed), dw from the
    gradient's jaxpr (a ragged-contracting ragged_dot_general is the wrapper's exact path)."""
    def lowered(a, b):
        text = jax.jit(lambda a, b: grouped_matmul(a, b, sizes, impl)).lower(a, b).as_text()
        return "ragged_dot fallback" if "chlo.ragged_dot" in text else "kernel"

    grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, impl) * ct), argnums=1))(x, w)
    if any(contracts for contracts in ragged_dots(grad.jaxpr)):
        dw = "XLA ragged-contracting dot (exact path)"
    else:
        dw = "megablox tgmm" if impl == "megablox" else "the kernel's VJP"
    return f"y: {lowered(x, w)}, dx: {lowered(ct, jnp.swapaxes(w, 1, 2))}, dw: {dw}"


def ragged_dots(jaxpr):
    """For each ragged_dot_general in ``jaxpr`` and its sub-jaxprs: whether it contracts the ragged dimension."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ragged_dot_general":
            dims = eqn.params["ragged_dot_dimension_numbers"]
            yield any(r in dims.dot_dimension_numbers[0][0] for r in dims.lhs_ragged_dimensions)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from ragged_dots(sub)


def run_case(name: str, check) -> bool:
    """One line per case: ok with what ``check`` returns, or FAIL with the error and where it came from."""
    try:
        print(f"ok    {name}: {check()}", flush=True)
        return True
    except Exception as e:  # report every case on its line, then fail
        frame = traceback.extract_tb(e.__traceback__)[-1]
        message = " ".join(str(e).split())[:600]
        print(f"FAIL  {name}: {type(e).__name__}: {message} ({pathlib.Path(frame.filename).name}:{frame.lineno})",
              flush=True)
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", help="grouped-matmul implementations to check besides ragged_dot "
                    "(default: this platform's: tokamax on GPU when installed, megablox on TPU)")
    ap.add_argument("--shape", default="8192,2048,1408", help="rows,d,f of the grouped-matmul cases")
    args = ap.parse_args()
    impls = args.kernels.split(",") if args.kernels else kernels()
    rows, d, f = (int(v) for v in args.shape.split(","))
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    results = []
    cases = [(*c, "ragged_dot") for c in CASES] + [(*c, impl) for c in CASES if c[3] == "dropless" for impl in impls]
    for mesh, router, k, dispatch, cf, impl in cases:
        name = f"{mesh} {router} k={k} {dispatch} cf={cf}" + (f" {impl}" if dispatch == "dropless" else "")

        def check(mesh=mesh, router=router, k=k, dispatch=dispatch, cf=cf, impl=impl):
            cfg = layer_spec(num_experts=E, experts_per_token=k, router=router, dispatch=dispatch, capacity_factor=cf,
                             activation="silu" if k == 2 else "gelu", gated=k == 2, grouped_matmul=impl)
            out, dropped = check_against_oracle(cfg, mesh)
            return f"dropped {dropped:.3f}"

        results.append(run_case(name, check))
    for impl in impls:
        for experts in (8, 64):
            results.append(run_case(f"grouped matmul {impl} E={experts} {rows} x {d} x {f} bf16",
                                    lambda impl=impl, experts=experts: grouped_matmul_case(impl, experts, rows, d, f)))
    passed, total = sum(results), len(results)
    print(f"{passed}/{total} cases equal the oracle on {jax.default_backend()}")
    print(f"oracle: {passed}/{total} passed", flush=True)
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
