"""moe-import at scale: generate a Mixtral-shaped model folder of about --size_gb (random float32
weights written tensor by tensor, no torch), then time ``moe-import`` on it and report its peak host
memory (the child's max RSS) against the model's size. Prints one JSON line last.

    python scripts/bench_import.py --size_gb 2.5 [--d_model 1024] [--folder /tmp/bench_import]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_folder(folder: pathlib.Path, size_gb: float, d: int) -> int:
    from hf_models import make_tokenizer
    from moe.config import MoEConfig, TransformerConfig
    from train.interop.families import tensors, to_hf_config
    from train.interop.safetensors import write_shards

    f, e, v = d * 7 // 2, 8, 32000
    per_layer = 4 * d * d // 2 + 3 * e * d * f  # GQA (kv = heads / 4) + 8 experts
    layers = max(1, round((size_gb * 2**30 / 4 - 2 * v * d) / per_layer))
    cfg = TransformerConfig(vocab_size=v, num_layers=layers, d_model=d, num_heads=16, num_kv_heads=4, d_ff=f,
                            tie_embeddings=False, moe=MoEConfig(num_experts=e, experts_per_token=2, expert_d_ff=f,
                                                                norm_topk_prob="on"))
    table = tensors("mixtral", cfg)
    plan = [(n, t.hf_shape, np.float32) for t in table for n in t.names]
    rng = np.random.default_rng(0)

    def produce():
        for name, shape, _ in plan:
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    folder.mkdir(parents=True)
    write_shards(folder, plan, produce, 2 << 30)
    (folder / "config.json").write_text(json.dumps(to_hf_config("mixtral", cfg, "float32")))
    make_tokenizer(folder / "tokenizer.json")
    return sum(int(np.prod(s)) * 4 for _, s, _ in plan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_gb", type=float, default=2.5)
    p.add_argument("--d_model", type=int, default=1024, help="model width (expert width 3.5x); depth fills the size")
    p.add_argument("--folder", default="/tmp/bench_import")
    args = p.parse_args()
    folder = pathlib.Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    model_bytes = make_folder(folder / "hf", args.size_gb, args.d_model)
    layers = json.loads((folder / "hf" / "config.json").read_text())["num_hidden_layers"]
    start = time.perf_counter()
    proc = subprocess.run([str(pathlib.Path(sys.executable).parent / "moe-import"), f"--hf_dir={folder / 'hf'}",
                           f"--workdir={folder / 'run'}"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {"model_gb": model_bytes / 2**30, "layers": layers, "d_model": args.d_model, "import_s": seconds, "peak_rss_gb": peak / 2**30,
              "peak_rss_over_model": peak / model_bytes}
    print(f"model {result['model_gb']:.2f} GiB ({layers} layers of width {args.d_model}): moe-import {seconds:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GiB "
          f"({result['peak_rss_over_model']:.2f}x the model)")
    print(json.dumps(result))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
