"""Tiny random Hugging Face MoE models for the interop tests, built with ``transformers`` on CPU in
float32 and saved with ``save_pretrained`` (no network), with a small BPE ``tokenizer.json``.

``reference(arch, folder)`` saves one and returns what the tests compare against (its logits on
``TOKENS``, the experts each MoE layer picks, greedy tokens). It needs torch: in an interpreter
without it (the Python 3.12 lane; PyPI's Linux torch for 3.12 is the CUDA build) the same is done by
the interpreter named in ``SWITCHYARD_HF_PYTHON`` running this file (``python hf_models.py build
ARCH FOLDER``, ``python hf_models.py logits FOLDER``), and read back from ``.npz`` files.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
VOCAB = 96
TOKENS = np.random.RandomState(0).randint(3, VOCAB - 8, size=(8, 12))
PROMPT, NEW_TOKENS = TOKENS[:1, :6], 32
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
        # YaRN over a 16-token original context, so the ramp falls inside the head's 8 frequencies
        yarn = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=16)
        return T.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=True, rope_parameters=yarn)
    if arch == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        # rms_norm_eps far from 1e-6: DeepSeek's two latent norms keep 1e-6 whatever it says
        common = dict(COMMON, num_key_value_heads=4, rms_norm_eps=1e-3)
        return T.DeepseekV3Config(**common, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5,
                                  # DeepSeek-V3's YaRN (mscale, mscale_all_dim: its softmax scale too)
                                  rope_parameters=dict(rope_type="yarn", rope_theta=10_000.0, factor=8.0,
                                                       original_max_position_embeddings=16, mscale=0.707,
                                                       mscale_all_dim=1.0, beta_fast=32, beta_slow=1))
    if arch == "gpt_oss":
        # windows of 4 (every other layer) and a clamp the random experts reach (make_model scales
        # them up); experts 32 wide on both sides (MXFP4 packs 32 values per scale); YaRN untruncated
        yarn = dict(rope_type="yarn", rope_theta=150_000.0, factor=4.0, original_max_position_embeddings=16,
                    beta_fast=32.0, beta_slow=1.0, truncate=False)
        return T.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                              sliding_window=4, swiglu_limit=1.0, rope_parameters=yarn, rms_norm_eps=1e-5)
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
            if name.endswith(("gate.weight", "router.weight")) or "norm" in name:
                p.add_(torch.randn_like(p) * (0.5 if "norm" in name else 1.0))
            elif arch == "gpt_oss" and name.endswith(("bias", "sinks")):  # every bias, the sinks
                p.copy_(torch.randn_like(p) * 0.5)
            elif arch == "gpt_oss" and name.endswith(("gate_up_proj", "down_proj")):  # experts past the clamp
                p.mul_(10.0 if name.endswith("gate_up_proj") else 3.0)
        if perturb_bias:
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn_like(b) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    make_tokenizer(folder / "tokenizer.json")
    return model


def _routes_and_logits(model, tokens):
    """(logits, {layer: [B*S, K] sorted top-k expert ids}) of a transformers MoE model."""
    import torch

    routes, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        moe = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
        gate = getattr(moe, "gate", None) or getattr(moe, "router", None)  # GPT-OSS: router
        if gate is None or not hasattr(moe, "experts"):
            continue
        hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: routes.__setitem__(i, out[2].numpy())))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, {i: np.sort(r, axis=-1) for i, r in routes.items()}


def _build(arch: str, folder: pathlib.Path) -> dict:
    import torch

    model = make_model(arch, folder)
    logits, routes = _routes_and_logits(model, TOKENS)
    with torch.no_grad():
        ids = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)[0, PROMPT.shape[1]:].numpy()
    out = {"logits": logits, "greedy": ids, **{f"route{i}": r for i, r in routes.items()}}
    np.savez(folder / "reference.npz", **out)
    return out


def _logits(folder: pathlib.Path) -> np.ndarray:
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.numpy()
    np.save(folder / "logits.npy", logits)
    return logits


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def _elsewhere(*args) -> None:
    """Run this file's command line with the interpreter that has torch (``SWITCHYARD_HF_PYTHON``)."""
    import pytest

    python = os.environ.get("SWITCHYARD_HF_PYTHON")
    if not python:
        pytest.skip("needs torch and transformers, or SWITCHYARD_HF_PYTHON naming a Python that has them")
    proc = subprocess.run([python, __file__, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def reference(arch: str, folder: pathlib.Path) -> dict:
    """Save a random ``arch`` model to ``folder``: {"logits", "greedy", "route<i>" per MoE layer}."""
    if has_torch():
        return _build(arch, folder)
    _elsewhere("build", arch, folder)
    with np.load(folder / "reference.npz") as data:
        return dict(data)


def hf_logits(folder: pathlib.Path) -> np.ndarray:
    """``from_pretrained(folder)``'s float32 logits on ``TOKENS``."""
    if has_torch():
        return _logits(folder)
    _elsewhere("logits", folder)
    return np.load(folder / "logits.npy")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "build":
        _build(rest[0], pathlib.Path(rest[1]))
    else:
        _logits(pathlib.Path(rest[0]))
