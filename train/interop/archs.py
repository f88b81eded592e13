"""The Hugging Face architectures Switchyard reads and writes: each one's ``config.json`` <-> a
``TransformerConfig``, and which of its tensors holds each Switchyard variable.

Supported (``model_type``): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3. A setting Switchyard
does not compute the same way (sliding windows, RoPE scaling, tied embeddings, clipped q/k/v...)
is refused with ``InteropError`` naming the ``config.json`` field, before anything is written.

Tensor layouts: a Hugging Face ``Linear`` stores [out, in]; Switchyard stores [in, (heads, head
dim | out)], experts stacked on a leading axis [E, ...]. DeepSeek's rotary parts are stored in
interleaved pairs (``rope_interleave``): their rows are reordered, evens then odds, into the
rotate-half layout Switchyard computes (the dot products are unchanged), and back on export.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moe.config import MLAConfig, MoEConfig, TransformerConfig
from moe.routers.learned import Frozen, TopK
from moe.routers.sigmoid import Sigmoid
from train.errors import ConfigError


class InteropError(ConfigError):
    """A model folder Switchyard cannot read or a checkpoint it cannot write in a format (one line)."""


ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
HF_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
              "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# ---------------------------------------------------------------- config.json <-> TransformerConfig
def _get(hf: dict, key: str, default=None, *, where: str = "config.json"):
    if key not in hf and default is None:
        raise InteropError(f"{where}: {key}: missing")
    return hf.get(key, default)


def _refuse(hf: dict, key: str, ok: Callable, why: str, where: str) -> None:
    if key in hf and not ok(hf[key]):
        raise InteropError(f"{where}: {key}={hf[key]!r}: {why}")


def rope_theta(hf: dict, where: str) -> float:
    """The RoPE base; scaled RoPE (YaRN, linear, dynamic...) is refused. ``rope_parameters`` is
    transformers 5's name, ``rope_scaling`` / ``rope_theta`` older configs'."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise InteropError(f"{where}: {key}.rope_type={kind!r}: not supported (plain RoPE only)")
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10_000.0)))


def from_hf_config(hf: dict, where: str = "config.json") -> tuple[str, TransformerConfig]:
    """(architecture, the Switchyard model config) of a Hugging Face ``config.json``."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise InteropError(f"{where}: model_type={arch!r}: not supported; Switchyard reads {', '.join(ARCHITECTURES)}")
    _refuse(hf, "tie_word_embeddings", lambda v: not v, "tied input/output embeddings are not supported", where)
    _refuse(hf, "hidden_act", lambda v: v == "silu", "only silu (SwiGLU) experts are supported", where)
    _refuse(hf, "sliding_window", lambda v: not v or not hf.get("use_sliding_window", arch == "mixtral"),
            "sliding-window attention is not supported", where)
    n_layers = int(_get(hf, "num_hidden_layers", where=where))
    heads = int(_get(hf, "num_attention_heads", where=where))
    kv = int(hf.get("num_key_value_heads") or heads)
    cfg = TransformerConfig(
        vocab_size=int(_get(hf, "vocab_size", where=where)), num_layers=n_layers, d_model=int(_get(hf, "hidden_size", where=where)),
        num_heads=heads, num_kv_heads=0 if kv == heads else kv, d_ff=int(_get(hf, "intermediate_size", where=where)),
        activation="silu", gated=True, tie_embeddings=False, rope_theta=rope_theta(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), moe_every=1, scan_layers="auto",
    )
    head_dim = hf.get("head_dim")
    if arch != "deepseek_v3" and head_dim and head_dim != cfg.d_model // heads:
        cfg.head_dim = int(head_dim)
    moe = MoEConfig(experts_per_token=int(_get(hf, "num_experts_per_tok", where=where)), router=TopK.name,
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_coef=0.0)
    if arch == "mixtral":
        moe.num_experts = int(_get(hf, "num_local_experts", where=where))
        moe.expert_d_ff, moe.norm_topk_prob = cfg.d_ff, "on"
    elif arch in ("qwen2_moe", "qwen3_moe"):
        moe.num_experts = int(hf.get("num_experts") or _get(hf, "num_local_experts", where=where))
        moe.expert_d_ff = int(_get(hf, "moe_intermediate_size", where=where))
        moe.norm_topk_prob = "on" if hf.get("norm_topk_prob") else "off"
        cfg.moe_every = int(hf.get("decoder_sparse_step", 1))
        only = sorted(hf.get("mlp_only_layers") or [])
        if only != list(range(len(only))):
            raise InteropError(f"{where}: mlp_only_layers={only}: only the first blocks can be dense")
        cfg.first_dense_layers = len(only)
        if arch == "qwen2_moe":
            cfg.attn_bias = bool(hf.get("qkv_bias", True))
            moe.shared_d_ff = int(hf.get("shared_expert_intermediate_size") or 0)
            moe.shared_gate = bool(moe.shared_d_ff)
        else:
            _refuse(hf, "attention_bias", lambda v: not v, "attention biases (q, k, v and o) are not supported", where)
            cfg.qk_norm = "head"
    elif arch == "olmoe":
        moe.num_experts = int(hf.get("num_experts") or _get(hf, "num_local_experts", where=where))
        moe.expert_d_ff = cfg.d_ff
        moe.norm_topk_prob = "on" if hf.get("norm_topk_prob") else "off"
        _refuse(hf, "clip_qkv", lambda v: v is None, "clipped q/k/v are not supported", where)
        _refuse(hf, "attention_bias", lambda v: not v, "attention biases are not supported", where)
        cfg.qk_norm = "proj"
    else:  # deepseek_v3
        _refuse(hf, "attention_bias", lambda v: not v, "attention biases are not supported", where)
        _refuse(hf, "moe_layer_freq", lambda v: v == 1, "only an MoE layer in every block after the dense ones", where)
        # DeepSeek's scoring_func and the router computing it share the name
        _refuse(hf, "scoring_func", lambda v: v == Sigmoid.name, "only sigmoid scores are supported", where)
        _refuse(hf, "topk_method", lambda v: v == "noaux_tc", "only noaux_tc (group-limited, biased) routing", where)
        cfg.attention = "mla"
        cfg.mla = MLAConfig(q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(_get(hf, "kv_lora_rank", where=where)),
                            nope_head_dim=int(_get(hf, "qk_nope_head_dim", where=where)),
                            rope_head_dim=int(_get(hf, "qk_rope_head_dim", where=where)),
                            v_head_dim=int(_get(hf, "v_head_dim", where=where)))
        cfg.first_dense_layers = int(hf.get("first_k_dense_replace", 0))
        moe.num_experts = int(_get(hf, "n_routed_experts", where=where))
        moe.expert_d_ff = int(_get(hf, "moe_intermediate_size", where=where))
        moe.shared_d_ff = int(hf.get("n_shared_experts") or 0) * moe.expert_d_ff
        moe.router, moe.aux_loss_coef = Sigmoid.name, 1e-4
        moe.num_groups, moe.topk_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        moe.routed_scaling = float(hf.get("routed_scaling_factor", 1.0))
        moe.norm_topk_prob = "on" if hf.get("norm_topk_prob", True) else "off"
    cfg.moe = moe
    try:
        moe.check()
        if cfg.attention == "mla":
            cfg.mla.check()
    except ValueError as e:
        raise InteropError(f"{where}: {e}") from None
    return arch, cfg


def infer_architecture(cfg: TransformerConfig) -> str:
    """The Hugging Face architecture a Switchyard model is exported as (by its distinctive pieces)."""
    if cfg.attention == "mla":
        return "deepseek_v3"
    if cfg.qk_norm == "proj":
        return "olmoe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.attn_bias or cfg.moe.shared_d_ff:
        return "qwen2_moe"
    return "mixtral"


def to_hf_config(arch: str, cfg: TransformerConfig, dtype: str) -> dict:
    """The ``config.json`` of ``cfg`` as ``arch``; ``InteropError`` when the model is not one."""
    m = cfg.moe
    where = f"--arch={arch}"

    def need(cond, field, why):
        if not cond:
            raise InteropError(f"{where}: model.{field}={_field(cfg, field)!r}: {why}")

    need(cfg.moe_every >= 1, "moe_every", "an MoE model is needed (>= 1)")
    need(not cfg.tie_embeddings, "tie_embeddings", "tied embeddings have no Hugging Face equivalent here")
    need(cfg.activation == "silu" and cfg.gated, "activation", "the architectures use SwiGLU (silu, gated)")
    norm = m.norm_topk_prob == "on" or (m.norm_topk_prob == "auto" and m.experts_per_token > 1)
    routers = (Sigmoid.name,) if arch == "deepseek_v3" else (TopK.name, Frozen.name)
    need(m.router in routers, "moe.router", f"{arch} routes with {' or '.join(routers)}")
    need(arch == "deepseek_v3" or not m.shared_d_ff or arch == "qwen2_moe", "moe.shared_d_ff",
         f"{arch} has no shared experts")
    need(cfg.attention == ("mla" if arch == "deepseek_v3" else "mha"), "attention", f"{arch} does not use it")
    need(cfg.qk_norm == {"qwen3_moe": "head", "olmoe": "proj"}.get(arch, "none"), "qk_norm", f"{arch} does not use it")
    need(cfg.attn_bias == (arch == "qwen2_moe"), "attn_bias", f"{arch} differs")
    if arch in ("mixtral", "olmoe", "deepseek_v3"):
        need(cfg.first_dense_layers == 0 or arch == "deepseek_v3", "first_dense_layers", f"{arch} has no dense blocks")
        need(cfg.moe_every == 1, "moe_every", f"{arch} has an MoE layer in every block")
    if arch in ("mixtral", "olmoe"):
        need((m.expert_d_ff or cfg.d_ff) == cfg.d_ff, "moe.expert_d_ff", f"{arch} experts have the model's d_ff")
    if arch == "mixtral":
        need(norm, "moe.norm_topk_prob", "mixtral always renormalises the chosen gates")
    out = {"architectures": [HF_CLASSES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
           "num_experts_per_tok": m.experts_per_token, "router_aux_loss_coef": m.aux_loss_coef,
           "max_position_embeddings": 4096, "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype,
           "initializer_range": 0.02}
    if arch == "mixtral":
        out.update(num_local_experts=m.num_experts, sliding_window=None)
    elif arch in ("qwen2_moe", "qwen3_moe"):
        out.update(num_experts=m.num_experts, moe_intermediate_size=m.expert_d_ff or cfg.d_ff, norm_topk_prob=norm,
                   decoder_sparse_step=cfg.moe_every, mlp_only_layers=list(range(cfg.first_dense_layers)),
                   use_sliding_window=False, sliding_window=None)
        if arch == "qwen2_moe":
            need(m.shared_gate == bool(m.shared_d_ff), "moe.shared_gate", "qwen2_moe gates its shared expert")
            out.update(shared_expert_intermediate_size=m.shared_d_ff, qkv_bias=cfg.attn_bias)
        else:
            out.update(head_dim=cfg.head_width, attention_bias=False)
    elif arch == "olmoe":
        out.update(num_experts=m.num_experts, norm_topk_prob=norm, clip_qkv=None, attention_bias=False)
    else:
        d = cfg.mla
        shared = m.shared_d_ff // (m.expert_d_ff or cfg.d_ff)
        need(shared * (m.expert_d_ff or cfg.d_ff) == m.shared_d_ff, "moe.shared_d_ff",
             "deepseek_v3's shared experts are a whole number of experts wide")
        out.update(n_routed_experts=m.num_experts, moe_intermediate_size=m.expert_d_ff or cfg.d_ff,
                   n_shared_experts=shared or None, first_k_dense_replace=cfg.first_dense_layers, moe_layer_freq=1,
                   n_group=m.num_groups, topk_group=m.topk_groups, routed_scaling_factor=m.routed_scaling,
                   norm_topk_prob=norm, q_lora_rank=d.q_lora_rank or None, kv_lora_rank=d.kv_lora_rank,
                   qk_nope_head_dim=d.nope_head_dim, qk_rope_head_dim=d.rope_head_dim, v_head_dim=d.v_head_dim,
                   head_dim=d.rope_head_dim, rope_interleave=True, attention_bias=False, scoring_func=Sigmoid.name,
                   topk_method="noaux_tc")
    return out


def _field(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Switchyard variable and the Hugging Face tensors that hold it.

    ``path``: its nested path in the unrolled layout ("blocks/3/attn/wq"); ``item``: "params" or
    "model_state"; ``names``: the Hugging Face tensors (one per expert for expert weights, which
    stack on axis 0); ``to_ours`` / ``to_hf``: one tensor's conversion (numpy), each other's inverse."""

    path: str
    item: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]  # of each named tensor
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return len(self.names) > 1


def _same(x):
    return x


def _t(x):
    return np.ascontiguousarray(x.T)


SAME = (_same, _same, lambda shape: shape)
TRANSPOSE = (_t, _t, lambda shape: shape[::-1])


def _heads_in(n, h, perm=None):
    """[N*H, in] <-> [in, N, H] (rows of each head reordered by ``perm`` on the way in)."""

    def ours(w):
        w = w.T.reshape(w.shape[1], n, h)
        return np.ascontiguousarray(w if perm is None else w[..., perm])

    def hf(w):
        w = w if perm is None else w[..., np.argsort(perm)]
        return np.ascontiguousarray(w.reshape(w.shape[0], n * h).T)

    return ours, hf, lambda shape: (n * h, shape[0])


def _heads_out(n, h):
    """[out, N*H] <-> [N, H, out]."""
    return (lambda w: np.ascontiguousarray(w.T.reshape(n, h, w.shape[0])),
            lambda w: np.ascontiguousarray(w.reshape(n * h, w.shape[-1]).T),
            lambda shape: (shape[-1], n * h))


def _reshape(shape, hf_shape=None):
    """[prod] (or ``hf_shape``) <-> ``shape``."""
    hf_shape = hf_shape or (int(np.prod(shape)),)
    return (lambda w: np.ascontiguousarray(w.reshape(shape)), lambda w: np.ascontiguousarray(w.reshape(hf_shape)),
            lambda _: hf_shape)


def _rope_perm(nope: int, rope: int, interleaved: bool) -> np.ndarray | None:
    """Columns [nope part, rotary part] with the rotary part's interleaved pairs as evens then odds."""
    if not interleaved:
        return None
    return np.concatenate([np.arange(nope), nope + np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])])


def _latent_in(perm):
    """kv_a_proj [Z+O, D] <-> [D, Z+O], the rotary columns reordered."""
    return (lambda w: np.ascontiguousarray(w.T[:, perm] if perm is not None else w.T),
            lambda w: np.ascontiguousarray((w[:, np.argsort(perm)] if perm is not None else w).T),
            lambda shape: shape[::-1])


def tensors(arch: str, cfg: TransformerConfig, interleaved: bool = True) -> list[Tensor]:
    """Every Switchyard variable of ``cfg`` (unrolled layout) with its Hugging Face tensors."""
    out: list[Tensor] = []
    d, n, j, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
    m = cfg.moe

    def add(path, names, shape, conv=SAME, item="params"):
        names = (names,) if isinstance(names, str) else tuple(names)
        one = tuple(shape[1:]) if len(names) > 1 else tuple(shape)
        out.append(Tensor(path, item, names, tuple(shape), tuple(conv[2](one)), conv[0], conv[1]))

    add("embed", "model.embed_tokens.weight", (cfg.vocab_size, d))
    add("unembed", "lm_head.weight", (d, cfg.vocab_size), TRANSPOSE)
    add("final_norm/scale", "model.norm.weight", (d,))
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}", f"blocks/{i}"
        add(f"{b}/attn_norm/scale", f"{p}.input_layernorm.weight", (d,))
        add(f"{b}/ffn_norm/scale", f"{p}.post_attention_layernorm.weight", (d,))
        a = f"{p}.self_attn"
        if cfg.attention == "mla":
            c = cfg.mla
            qk = c.nope_head_dim + c.rope_head_dim
            perm = _rope_perm(c.nope_head_dim, c.rope_head_dim, interleaved)
            if c.q_lora_rank:
                add(f"{b}/attn/wq_a", f"{a}.q_a_proj.weight", (d, c.q_lora_rank), TRANSPOSE)
                add(f"{b}/attn/q_norm/scale", f"{a}.q_a_layernorm.weight", (c.q_lora_rank,))
                add(f"{b}/attn/wq", f"{a}.q_b_proj.weight", (c.q_lora_rank, n, qk), _heads_in(n, qk, perm))
            else:
                add(f"{b}/attn/wq", f"{a}.q_proj.weight", (d, n, qk), _heads_in(n, qk, perm))
            lat_perm = None if perm is None else np.concatenate(
                [np.arange(c.kv_lora_rank), c.kv_lora_rank + perm[c.nope_head_dim:] - c.nope_head_dim])
            add(f"{b}/attn/wkv_a", f"{a}.kv_a_proj_with_mqa.weight", (d, c.kv_lora_rank + c.rope_head_dim),
                _latent_in(lat_perm))
            add(f"{b}/attn/kv_norm/scale", f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,))
            add(f"{b}/attn/wkv_b", f"{a}.kv_b_proj.weight", (c.kv_lora_rank, n, c.nope_head_dim + c.v_head_dim),
                _heads_in(n, c.nope_head_dim + c.v_head_dim))
            add(f"{b}/attn/wo", f"{a}.o_proj.weight", (n, c.v_head_dim, d), _heads_out(n, c.v_head_dim))
        else:
            add(f"{b}/attn/wq", f"{a}.q_proj.weight", (d, n, h), _heads_in(n, h))
            add(f"{b}/attn/wk", f"{a}.k_proj.weight", (d, j, h), _heads_in(j, h))
            add(f"{b}/attn/wv", f"{a}.v_proj.weight", (d, j, h), _heads_in(j, h))
            add(f"{b}/attn/wo", f"{a}.o_proj.weight", (n, h, d), _heads_out(n, h))
            if cfg.attn_bias:
                for x, heads in (("q", n), ("k", j), ("v", j)):
                    add(f"{b}/attn/b{x}", f"{a}.{x}_proj.bias", (heads, h), _reshape((heads, h)))
            if cfg.qk_norm == "head":
                add(f"{b}/attn/q_norm/scale", f"{a}.q_norm.weight", (h,))
                add(f"{b}/attn/k_norm/scale", f"{a}.k_norm.weight", (h,))
            elif cfg.qk_norm == "proj":
                add(f"{b}/attn/q_norm/scale", f"{a}.q_norm.weight", (n, h), _reshape((n, h)))
                add(f"{b}/attn/k_norm/scale", f"{a}.k_norm.weight", (j, h), _reshape((j, h)))
        if not cfg.is_moe_block(i):
            _ffn(add, f"{b}/ffn", f"{p}.mlp", d, cfg.d_ff)
            continue
        moe_name = "block_sparse_moe" if arch == "mixtral" else "mlp"
        f = m.expert_d_ff or cfg.d_ff
        gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        experts = [f"{p}.{moe_name}.experts.{e}" for e in range(m.num_experts)]
        add(f"{b}/ffn/router/w", f"{p}.{moe_name}.gate.weight", (d, m.num_experts), TRANSPOSE)
        add(f"{b}/ffn/wg", [f"{x}.{gate}.weight" for x in experts], (m.num_experts, d, f), TRANSPOSE)
        add(f"{b}/ffn/wi", [f"{x}.{up}.weight" for x in experts], (m.num_experts, d, f), TRANSPOSE)
        add(f"{b}/ffn/wo", [f"{x}.{down}.weight" for x in experts], (m.num_experts, f, d), TRANSPOSE)
        if arch == "deepseek_v3":
            add(f"{b}/ffn/router/bias", f"{p}.mlp.gate.e_score_correction_bias", (m.num_experts,), item="model_state")
        if m.shared_d_ff:
            shared = "shared_experts" if arch == "deepseek_v3" else "shared_expert"
            _ffn(add, f"{b}/shared", f"{p}.mlp.{shared}", d, m.shared_d_ff)
            if m.shared_gate:
                add(f"{b}/shared_gate", f"{p}.mlp.shared_expert_gate.weight", (d,), _reshape((d,), (1, d)))
    return out


def _ffn(add, ours: str, hf: str, d: int, f: int) -> None:
    add(f"{ours}/wg", f"{hf}.gate_proj.weight", (d, f), TRANSPOSE)
    add(f"{ours}/wi", f"{hf}.up_proj.weight", (d, f), TRANSPOSE)
    add(f"{ours}/wo", f"{hf}.down_proj.weight", (f, d), TRANSPOSE)
