"""The MoE layer against the naive oracle (tests/oracle.py) on one accelerator, forward and gradients.

The test suite pins everything to 8 emulated CPU devices; this runs the single-device cases of
the same oracle check on whatever JAX's default backend is (a GPU here), so the accelerator's
kernels (sorting, gathers, the batched expert matmuls, the grouped matmul of dropless dispatch
through every implementation this platform has: ``ragged_dot``, and ``tokamax`` on GPU or
``megablox`` on TPU) are checked against the reference. Float32 matmuls run at full precision (no
TF32) for the check. Then the grouped matmul alone at the 1B config's widths (d=2048, expert
d_ff=1408, 8192 rows, E=8 and 64, bf16, uneven groups with an empty one), forward and gradients
against ``jax.lax.ragged_dot`` in float32; the line says whether a kernel ran or the wrapper fell
back to ``ragged_dot`` (tokamax refuses some shapes and GPUs).

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
    and of both gradients, relative to the largest reference value; whether a kernel ran)."""
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
        return (fwd(x, w).astype(jnp.float32), *jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)), fwd.lower(x, w).as_text()

    got, hlo = run(impl, jnp.bfloat16)
    ref, _ = run("ragged_dot", jnp.float32)
    errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r))) for g, r in zip(got, ref)]
    if max(errs) > 2e-2 or not all(bool(jnp.all(jnp.isfinite(g))) for g in got):
        raise AssertionError(f"relative errors (y, dx, dw) {np.round(errs, 4)}")
    ran = "ragged_dot fallback" if "ragged_dot" in hlo else "kernel"
    return f"relative errors (y, dx, dw) {np.round(errs, 4).tolist()}; {ran}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", help="grouped-matmul implementations to check besides ragged_dot "
                    "(default: this platform's: tokamax on GPU when installed, megablox on TPU)")
    ap.add_argument("--shape", default="8192,2048,1408", help="rows,d,f of the grouped-matmul cases")
    args = ap.parse_args()
    impls = args.kernels.split(",") if args.kernels else kernels()
    rows, d, f = (int(v) for v in args.shape.split(","))
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    failed = total = 0
    cases = [(*c, "ragged_dot") for c in CASES] + [(*c, impl) for c in CASES if c[3] == "dropless" for impl in impls]
    for mesh, router, k, dispatch, cf, impl in cases:
        cfg = layer_spec(num_experts=E, experts_per_token=k, router=router, dispatch=dispatch,
                        capacity_factor=cf, activation="silu" if k == 2 else "gelu", gated=k == 2, grouped_matmul=impl)
        name = f"{mesh} {router} k={k} {dispatch} cf={cf}" + (f" {impl}" if dispatch == "dropless" else "")
        total += 1
        try:
            out, dropped = check_against_oracle(cfg, mesh)
            print(f"ok    {name}: dropped {dropped:.3f}", flush=True)
        except Exception:  # report every case, then fail
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc(limit=3)}", flush=True)
    for impl in impls:
        for experts in (8, 64):
            total += 1
            name = f"grouped matmul {impl} E={experts} {rows} x {d} x {f} bf16"
            try:
                print(f"ok    {name}: {grouped_matmul_case(impl, experts, rows, d, f)}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL  {name}\n{traceback.format_exc(limit=3)}", flush=True)
    print(f"{total - failed}/{total} cases equal the oracle on {jax.default_backend()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
