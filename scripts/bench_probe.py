"""What the router telemetry costs: one probe (the evaluation forward pass on the fixed batch and
the read-back of its routes) against one training step of the same model, timed in alternation.

    python scripts/bench_probe.py [--config=configs/default.py] [--repeats=7] [--steps=10] [--cpu_devices=8]

Prints the medians and the share of training time the probe adds at the config's
``log_every_steps`` (one probe per logged step).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/default.py"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="training steps (and probes) per timed repeat")
    p.add_argument("--cpu_devices", type=int, default=8)
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from train.core.config import load_config_file
    from train.core.setup import setup

    cfg = load_config_file(args.config)
    cfg.data.max_bytes = min(cfg.data.max_bytes or 2_000_000, 2_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        run, state = setup(cfg, pathlib.Path(tmp) / "run", log=lambda m: None)
        held = {"state": state}
        try:
            if run.probe is None:
                p.error(f"--config={args.config}: no router probe for this model (dense, or a stochastic router)")
            with run.context():
                batch = run.global_batch(next(run.batches))

                def steps():
                    for _ in range(args.steps):
                        held["state"], metrics = run.train_step(held["state"], batch)
                    jax.block_until_ready(metrics)

                def probes():
                    for _ in range(args.steps):
                        routes = jax.device_get(run.routing_probe(held["state"]))
                    return routes

                steps(), probes()  # compile both
                step_s, probe_s = [], []
                for _ in range(args.repeats):
                    for fn, out in ((steps, step_s), (probes, probe_s)):
                        start = time.perf_counter()
                        fn()
                        out.append((time.perf_counter() - start) / args.steps)
        finally:
            run.close()
    step, probe = statistics.median(step_s), statistics.median(probe_s)
    every = cfg.log_every_steps
    print(f"training step {1e3 * step:.1f} ms, probe {1e3 * probe:.1f} ms (medians of {args.repeats} x {args.steps}); "
          f"probe / step = {probe / step:.2f}; at log_every_steps={every}: +{100 * probe / step / every:.1f}% of training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
