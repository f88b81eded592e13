"""The MoE layer against the naive oracle (tests/oracle.py) on one accelerator, forward and gradients.

The test suite pins everything to 8 emulated CPU devices; this runs the single-device cases of
the same oracle check on whatever JAX's default backend is (a GPU here), so the accelerator's
kernels (sorting, gathers, the batched expert matmuls, ``ragged_dot`` for dropless dispatch) are
checked against the reference. Float32 matmuls run at full precision (no TF32) for the check.

    JAX_PLATFORMS=cuda python scripts/gpu_oracle.py

One device cannot exercise the all-to-all over the ``expert`` axis; the CPU suite covers that.
Exits 1 if any case differs from the oracle.
"""

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

from moe import MoEConfig  # noqa: E402
from harness import D, E, H  # noqa: E402

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


def main() -> int:
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    failed = 0
    for mesh, router, k, dispatch, cf in CASES:
        cfg = MoEConfig(d_model=D, d_ff=H, num_experts=E, experts_per_token=k, router=router, dispatch=dispatch,
                        capacity_factor=cf, activation="silu" if k == 2 else "gelu", gated=k == 2)
        name = f"{mesh} {router} k={k} {dispatch} cf={cf}"
        try:
            out, dropped = check_against_oracle(cfg, mesh)
            print(f"ok    {name}: dropped {dropped:.3f}", flush=True)
        except Exception:  # report every case, then fail
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc(limit=3)}", flush=True)
    print(f"{len(CASES) - failed}/{len(CASES)} cases equal the oracle on {jax.default_backend()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
