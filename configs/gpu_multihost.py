"""A 2.9B-parameter MoE (0.82B active per token) for several hosts of 8 GPUs (e.g. 4 x 8 H100/H200).

The model of configs/gpu_1b.py with 32 experts instead of 8 (top-2): the expert axis stays inside
a host (expert=8, four experts per GPU over NVLink) and the hosts form the data axis
(``mesh.data=-1`` fills it with however many join), so the all-to-alls never cross the network
and only the gradient all-reduce does. The global batch grows to 512 sequences of 2048 tokens.
Under SLURM, one process per host using all 8 of its GPUs:

    sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_slurm.sh \\
        --config=configs/gpu_multihost.py --workdir=/shared/runs/gpu_multihost \\
        --config.data.path='/shared/data/*.jsonl'

which runs on every host

    moe-train --config=configs/gpu_multihost.py --workdir=/shared/runs/gpu_multihost --distributed=auto ...

The workdir and data must be on storage every host sees; see the README, "Multi-host".
"""

import gpu_1b  # configs/gpu_1b.py (the config loader puts this folder on sys.path)

from train.core.config import Config


def get_config() -> Config:
    cfg = gpu_1b.get_config()
    cfg.model.moe.num_experts = 32
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = -1, 1, 8, 1
    cfg.train.batch_size = 512
    return cfg
