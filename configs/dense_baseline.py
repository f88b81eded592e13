"""The dense baseline for configs/default.py: same shape and active FLOPs per token, no experts.

Every block has a dense FFN of the experts' width, so a token costs what it costs in the top-1
MoE model (less the tiny router); only the parameter count differs.

    moe-train --config=configs/dense_baseline.py --workdir=runs/dense_baseline
"""

import default  # configs/default.py (the config loader puts this folder on sys.path)

from train.core.config import Config


def get_config() -> Config:
    cfg = default.get_config()
    cfg.model.moe_every = 0
    return cfg
