"""A 1.23B-parameter MoE (0.82B active per token) for one host with 8 GPUs (e.g. 8 x H100/H200).

16 layers of width 2048; every second block is an MoE FFN with 8 experts (top-2, Mixtral-style),
one expert per GPU along the ``expert`` axis; bfloat16 activations, float32 parameters and router;
a 32k BPE trained on the first 200 MB of the data. Bring your own text: a folder, glob or
.jsonl files with a "text" field (or a folder made by ``moe-data prepare``, which tokenizes it once).

The 16 blocks run as one scan over 8 repeats of (dense, MoE) (``model.scan_layers="auto"``). Each
step of 256 x 2048 tokens is 8 micro-batches of 32 sequences, and every block keeps only its
matmul outputs for the backward pass (``model.remat="save_dots"``): ``moe-train --plan
--cpu_devices=8`` puts the step at about 50 GiB per device (without remat and accumulation: 545 GiB).

    moe-train --config=configs/gpu_1b.py --workdir=/checkpoints/gpu_1b \\
        --config.data.path='/data/corpus/*.jsonl'

For several hosts use the same config with a launcher (see the README, "Multi-host").
"""

from train.core.config import Config


def get_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size = 32_768
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 16, 2048, 16, 5632
    m.moe_every, m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_d_ff = 2, 8, 2, 1408
    m.moe.router, m.moe.capacity_factor, m.tie_embeddings = "topk", 1.25, False
    m.dtype = "bfloat16"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = -1, 1, 8, 1
    cfg.mesh.rules = "ep"
    m.remat = "save_dots"
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 20_000, 256, 2048
    cfg.train.grad_accum_steps = 8
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 3e-4, 2_000
    cfg.data.tokenizer, cfg.data.bpe_vocab_size, cfg.data.max_bytes = "bpe", 32_000, 0
    cfg.checkpoint.every_steps, cfg.checkpoint.keep = 1_000, 3
    cfg.log_every_steps, cfg.eval_every_steps, cfg.eval_batches = 50, 1_000, 50
    return cfg
