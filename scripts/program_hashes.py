"""Fingerprints of the compiled MoE layer programs that ``moe-bench layer`` times.

Run in two checkouts: equal fingerprints mean XLA compiled the same program (source locations
aside), so a change cannot have moved the layer's speed on this backend, whatever the noise of a
timed run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/program_hashes.py

One line per (experts, k, tokens per device) of the CPU sweep's corners: the sha256 of the
optimized HLO of forward + backward, with metadata and stack frames removed.
"""

import hashlib
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from sharding.mesh import batch_axes, make_mesh  # noqa: E402
from train.analysis.bench_layer import BenchConfig, _cases, _compiled_fwd_bwd  # noqa: E402

CASES = ((8, 1, 1024), (64, 2, 1024), (128, 1, 4096), (128, 2, 4096))


def normalized(hlo: str) -> str:
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    hlo = re.sub(r"stack_frame_id=\d+", "", hlo)
    return "\n".join(line for line in hlo.splitlines() if "file_name_id" not in line and not re.match(r'\d+ "', line))


def main() -> None:
    cfg = BenchConfig()
    with jax.set_mesh(make_mesh(data=cfg.data, expert=cfg.expert)):
        spec = jax.P(batch_axes(jax.sharding.get_abstract_mesh()))
        for experts, k, tokens in CASES:
            b = tokens * cfg.data * cfg.expert // cfg.seq_len
            x = jax.random.normal(jax.random.key(0), (b, cfg.seq_len, cfg.d_model), out_sharding=spec)
            ids = jax.random.randint(jax.random.key(1), (b, cfg.seq_len), 0, 50_000, out_sharding=spec)
            compiled, _ = _compiled_fwd_bwd(*_cases(cfg, experts, k, ids)["moe"], x)
            digest = hashlib.sha256(normalized(compiled.as_text()).encode()).hexdigest()[:16]
            print(f"E={experts} k={k} tokens/device={tokens}: {digest}", flush=True)


if __name__ == "__main__":
    main()
