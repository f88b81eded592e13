"""The laptop config: a small MoE language model on 8 emulated CPU devices (data=2 x expert=4).

8 experts, top-1 routing in every second block, byte tokenizer, trained on the running Python's
standard library sources. Finishes in a few minutes on 2 CPU cores.

Routing is StableMoE's two stages (router "stable"): a learned top-1 router routes for the first
10 steps while a token -> expert table is distilled from it; then the table, frozen with a cap on
each expert's share of the token mass, routes with gate 1. Measured over 3 seeds it beats the
dense baseline (configs/dense_baseline.py) and plain learned top-1 (router "topk"), which trails
the dense model; see the README's routing study.

    make train
    # or: moe-train --config=configs/default.py --workdir=runs/default
"""

from train.core.config import Config


def get_config() -> Config:
    cfg = Config()
    cfg.model.num_layers = 4
    cfg.model.d_model = 128
    cfg.model.num_heads = 4
    cfg.model.d_ff = 512
    cfg.model.moe_every = 2
    cfg.model.moe.num_experts = 8
    cfg.model.moe.experts_per_token = 1
    cfg.model.moe.router = "stable"
    cfg.model.moe.router_options.stable.freeze_step = 10
    cfg.model.moe.router_options.stable.balance = 1.25
    cfg.model.moe.router_options.stable.gate = "one"
    cfg.model.moe.capacity_factor = 1.25
    cfg.mesh.data = 2
    cfg.mesh.expert = 4
    cfg.train.steps = 600
    cfg.train.batch_size = 16
    cfg.train.seq_len = 128
    cfg.optimizer.learning_rate = 3e-3
    cfg.optimizer.warmup_steps = 30
    cfg.data.max_bytes = 8_000_000
    cfg.checkpoint.every_steps = 200
    cfg.log_every_steps = 10
    cfg.eval_every_steps = 200
    return cfg
