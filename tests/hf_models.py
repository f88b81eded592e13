"""Tiny random Hugging Face MoE models for the interop tests, built with ``transformers`` on CPU in
float32 and saved with ``save_pretrained`` (no network), with a small BPE ``tokenizer.json``."""

from __future__ import annotations

import pathlib

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(arch: str):
    import transformers as T

    if arch == "mixtral":
        return T.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                               rope_theta=1e6)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                                mlp_only_layers=[0])
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    if arch == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        common = dict(COMMON, num_key_value_heads=4)
        return T.DeepseekV3Config(**common, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5)
    raise ValueError(arch)


def make_tokenizer(path: pathlib.Path, specials=("<pad>", "<bos>", "<eos>")) -> None:
    """A byte-level BPE of fewer than VOCAB tokens with ``specials`` at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=list(specials),
                                  initial_alphabet=[], show_progress=False)
    text = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog", "import os\nimport sys\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))


def make_model(arch: str, folder: pathlib.Path, seed: int = 0, perturb_bias: bool = True):
    """Save a random ``arch`` model (and tokenizer) to ``folder``; returns the torch model (eval)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
    with torch.no_grad():  # spread the router and norm weights so routing and norms are exercised
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "norm" in name:
                p.add_(torch.randn_like(p) * (0.5 if "norm" in name else 1.0))
        if perturb_bias:
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn_like(b) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    make_tokenizer(folder / "tokenizer.json")
    return model
