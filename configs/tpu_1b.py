"""The 1.23B-parameter MoE of configs/gpu_1b.py laid out for a TPU slice with FSDP.

Parameters (dense and expert) are sharded over ``fsdp`` and gathered layer by layer; experts
over ``expert``. On a v5p-32 (16 chips) this is fsdp=2 x expert=8; ``fsdp=-1`` fills any slice
whose chip count is a multiple of 8.

    # on every TPU VM worker of the slice (see scripts/ and the README, "Multi-host"):
    moe-train --config=configs/tpu_1b.py --workdir=/mnt/gcs/runs/tpu_1b \\
        --config.data.path='/data/corpus/*.jsonl'
"""

import gpu_1b  # configs/gpu_1b.py (the config loader puts this folder on sys.path)

from train.core.config import Config


def get_config() -> Config:
    cfg = gpu_1b.get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = 1, -1, 8, 1
    cfg.mesh.rules = "fsdp"
    cfg.train.batch_size = 512
    return cfg
