"""What every Hugging Face family shares (``Family``): reading the common ``config.json`` keys into a
``TransformerConfig``, the requirements and keys every export has, and the tensor map of embeddings,
norms, standard attention, dense feed-forward blocks and expert stacks. A family names what differs
in class attributes and overrides the hooks (``read``, ``hf_fields``, ``attention_tensors``...).

Conversions (``SAME``, ``TRANSPOSE``, ``_heads_in``...) are triples (to ours, to Hugging Face's, the
Hugging Face shape of a Switchyard shape), numpy only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from moe.config import MoEConfig, RopeScaling, TransformerConfig
from moe.routers.learned import Frozen, TopK
from train.errors import ConfigError


class InteropError(ConfigError):
    """A model folder Switchyard cannot read or a checkpoint it cannot write in a format (one line)."""


# ---------------------------------------------------------------- config.json
def _get(hf: dict, key: str, default=None, *, where: str = "config.json"):
    if key not in hf and default is None:
        raise InteropError(f"{where}: {key}: missing")
    return hf.get(key, default)


def _refuse(hf: dict, key: str, ok: Callable, why: str, where: str) -> None:
    if key in hf and not ok(hf[key]):
        raise InteropError(f"{where}: {key}={hf[key]!r}: {why}")


def rope_theta(hf: dict, where: str, default: float = 10_000.0) -> float:
    """The RoPE base. ``rope_parameters`` is transformers 5's name, ``rope_scaling`` / ``rope_theta``
    older configs'."""
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", default)))


def rope_scaling(hf: dict, where: str) -> RopeScaling:
    """YaRN's settings from ``rope_parameters`` (or ``rope_scaling``); plain RoPE is ``kind="none"``,
    and any other scaling (linear, dynamic, longrope...) is refused, named."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            continue
        if kind != "yarn":
            raise InteropError(f"{where}: {key}.rope_type={kind!r}: not supported (plain RoPE or yarn)")
        _refuse(params, "partial_rotary_factor", lambda v: v == 1, "rotary embedding of every dimension only",
                f"{where}: {key}")
        original = params.get("original_max_position_embeddings") or _get(hf, "max_position_embeddings", where=where)
        factor = params.get("factor") or _get(hf, "max_position_embeddings", where=where) / original
        scaling = RopeScaling("yarn", float(factor), int(original), float(params.get("beta_fast") or 32),
                              float(params.get("beta_slow") or 1), float(params.get("attention_factor") or 0),
                              float(params.get("mscale") or 0), float(params.get("mscale_all_dim") or 0),
                              bool(params.get("truncate", True)))
        try:
            return scaling.check()
        except ValueError as e:
            raise InteropError(f"{where}: {key}: {e}") from None
    return RopeScaling()


def rope_scaling_fields(cfg: TransformerConfig) -> dict:
    """``config.json``'s RoPE keys for ``cfg`` (the ``rope_scaling`` of YaRN, if any)."""
    s = cfg.rope_scaling
    if s.kind == "none":
        return {"rope_theta": cfg.rope_theta, "max_position_embeddings": 4096}
    params = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_positions,
              "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
    params.update({k: getattr(s, k) for k in ("attention_factor", "mscale", "mscale_all_dim") if getattr(s, k)})
    return {"rope_theta": cfg.rope_theta, "rope_scaling": params,
            "max_position_embeddings": max(4096, int(s.original_max_positions * s.factor))}


def num_experts(hf: dict, where: str) -> int:
    """``num_experts``, else ``num_local_experts``."""
    return int(hf.get("num_experts") or _get(hf, "num_local_experts", where=where))


def on_off(value) -> str:
    """A ``config.json`` boolean as a ``MoEConfig`` switch."""
    return "on" if value else "off"


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
    stack on axis 0); ``to_ours`` / ``to_hf``: one tensor's conversion (numpy), each other's inverse.
    ``join``: set when several variables share one Hugging Face tensor (GPT-OSS's interleaved gate and
    up projections): ``to_ours`` takes this variable's part of it, ``to_hf`` gives the part, and
    ``join`` makes the tensor of all the parts (in table order)."""

    path: str
    item: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]  # of each named tensor
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    join: Callable[..., np.ndarray] | None = None

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


class Table(list):
    """The tensor map being built, in order."""

    def add(self, path, names, shape, conv=SAME, item="params") -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        one = tuple(shape[1:]) if len(names) > 1 else tuple(shape)
        self.append(Tensor(path, item, names, tuple(shape), tuple(conv[2](one)), conv[0], conv[1]))

    def joined(self, paths, name, shape, convs, join) -> None:
        """Variables ``paths`` (each of ``shape``) held together in one tensor ``name``: ``convs``
        (a conversion each) take each one's part, ``join`` makes the tensor of the parts."""
        for path, conv in zip(paths, convs, strict=True):
            self.append(Tensor(path, "params", (name,), tuple(shape), tuple(conv[2](tuple(shape))), conv[0], conv[1],
                               join))

    def ffn(self, ours: str, hf: str, d: int, f: int) -> None:
        """A dense SwiGLU feed-forward block (gate_proj, up_proj, down_proj)."""
        self.add(f"{ours}/wg", f"{hf}.gate_proj.weight", (d, f), TRANSPOSE)
        self.add(f"{ours}/wi", f"{hf}.up_proj.weight", (d, f), TRANSPOSE)
        self.add(f"{ours}/wo", f"{hf}.down_proj.weight", (f, d), TRANSPOSE)


# ---------------------------------------------------------------- the family
class Family:
    """One Hugging Face architecture (``model_type`` ``name``): its ``config.json`` <-> a
    ``TransformerConfig`` and its tensor map. Subclasses set the attributes and override the hooks."""

    name: str = ""  # the model_type
    hf_class: str = ""  # config.json's architectures[0]
    priority: int = 0  # infer_architecture picks the matching family of the highest priority
    # config.json
    sliding_window_default = False  # use_sliding_window when config.json does not say
    reads_head_dim = True  # head_dim sets the attention heads' width
    # the Switchyard models it expresses
    routers: tuple[str, ...] = (TopK.name, Frozen.name)
    attention = "mha"  # TransformerConfig.attention
    qk_norm = "none"  # TransformerConfig.qk_norm
    attn_bias = False  # q/k/v biases (TransformerConfig.attn_bias)
    first_dense = False  # dense blocks may come first
    # GPT-OSS's pieces (TransformerConfig.attn_out_bias, attn_sinks, ffn_bias, swiglu_limit > 0,
    # moe.router_bias, sliding_window)
    attn_out_bias = attn_sinks = ffn_bias = clamped_swiglu = learned_router_bias = sliding_windows = False
    moe_every_block = True  # every block after those is an MoE one
    experts_at_d_ff = False  # the experts are the model's d_ff wide
    # tensor names
    moe_module = "mlp"  # the MoE layer under model.layers.<i>
    expert_names = ("gate_proj", "up_proj", "down_proj")  # each expert's gate, up and down projections
    shared_expert = ""  # the shared experts under the MoE layer ("": the family has none)
    gates_shared = False  # a sigmoid gate scales the shared experts' output (MoEConfig.shared_gate)
    router_bias = ""  # the router's bias buffer under its gate ("": none)
    # what the family's transformers config class takes for a key config.json leaves out
    # (num_key_value_heads None: as many as the attention heads)
    defaults = {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "router_aux_loss_coef": 0.001, "num_key_value_heads": None}

    def matches(self, cfg: TransformerConfig) -> bool:
        """Whether ``cfg`` has this family's distinctive pieces (``infer_architecture``)."""
        return False

    def unread_layers(self, hf: dict):
        """How many layers after num_hidden_layers a model folder may hold that Switchyard does not read."""
        return 0

    # ------------------------------------------------------------ config.json -> TransformerConfig
    def from_hf_config(self, hf: dict, where: str) -> TransformerConfig:
        """The Switchyard model config of ``hf`` (this family's ``config.json``)."""
        _refuse(hf, "tie_word_embeddings", lambda v: not v, "tied input/output embeddings are not supported", where)
        _refuse(hf, "hidden_act", lambda v: v == "silu", "only silu (SwiGLU) experts are supported", where)
        _refuse(hf, "sliding_window", lambda v: not v or not hf.get("use_sliding_window", self.sliding_window_default),
                "sliding-window attention is not supported", where)
        cfg = self._transformer(hf, where)
        moe = MoEConfig(experts_per_token=int(_get(hf, "num_experts_per_tok", where=where)), router=TopK.name,
                        aux_loss_coef=float(self._or_default(hf, "router_aux_loss_coef")), z_loss_coef=0.0)
        self.read(hf, cfg, moe, where)
        cfg.moe = moe
        try:
            moe.check()
            if cfg.attention == "mla":
                cfg.mla.check()
        except ValueError as e:
            raise InteropError(f"{where}: {e}") from None
        return cfg

    def _transformer(self, hf: dict, where: str) -> TransformerConfig:
        n_layers = int(_get(hf, "num_hidden_layers", where=where))
        heads = int(_get(hf, "num_attention_heads", where=where))
        kv = int(self._or_default(hf, "num_key_value_heads") or heads)
        cfg = TransformerConfig(
            vocab_size=int(_get(hf, "vocab_size", where=where)), num_layers=n_layers,
            d_model=int(_get(hf, "hidden_size", where=where)), num_heads=heads, num_kv_heads=0 if kv == heads else kv,
            d_ff=int(_get(hf, "intermediate_size", where=where)), activation="silu", gated=True, tie_embeddings=False,
            rope_theta=rope_theta(hf, where, self.defaults["rope_theta"]), rope_scaling=rope_scaling(hf, where),
            norm_eps=float(self._or_default(hf, "rms_norm_eps")), moe_every=1,
            scan_layers="auto",
        )
        head_dim = hf.get("head_dim")
        if self.reads_head_dim and head_dim and head_dim != cfg.d_model // heads:
            cfg.head_dim = int(head_dim)
        return cfg

    def _or_default(self, hf: dict, key: str):
        """``hf[key]``, or the family's default when config.json leaves it out (or null)."""
        value = hf.get(key)
        return self.defaults[key] if value is None else value

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        """This family's own keys into ``cfg`` and ``moe`` (the experts, above all); ``InteropError``
        for a setting Switchyard does not compute the same way."""
        raise NotImplementedError

    # ------------------------------------------------------------ TransformerConfig -> config.json
    def need(self, cfg: TransformerConfig, cond, field: str, why: str) -> None:
        """``InteropError`` naming ``model.<field>`` unless ``cond``."""
        if not cond:
            raise InteropError(f"--arch={self.name}: model.{field}={_field(cfg, field)!r}: {why}")

    def to_hf_config(self, cfg: TransformerConfig, dtype: str) -> dict:
        """The ``config.json`` of ``cfg``; ``InteropError`` when the model is not one of this family."""
        self._check(cfg)
        m = cfg.moe
        norm = m.norm_topk_prob == "on" or (m.norm_topk_prob == "auto" and m.experts_per_token > 1)
        out = {"architectures": [self.hf_class], "model_type": self.name, "vocab_size": cfg.vocab_size,
               "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
               "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
               "rms_norm_eps": cfg.norm_eps, **rope_scaling_fields(cfg), "tie_word_embeddings": False,
               "num_experts_per_tok": m.experts_per_token, "router_aux_loss_coef": m.aux_loss_coef,
               "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype,
               "initializer_range": 0.02}
        out.update(self.hf_fields(cfg, norm))
        return out

    def _check(self, cfg: TransformerConfig) -> None:
        """The requirements the attributes state, in order."""
        m, arch, need = cfg.moe, self.name, functools.partial(self.need, cfg)
        need(cfg.moe_every >= 1, "moe_every", "an MoE model is needed (>= 1)")
        need(not cfg.tie_embeddings, "tie_embeddings", "tied embeddings have no Hugging Face equivalent here")
        need(cfg.activation == "silu" and cfg.gated, "activation", "the architectures use SwiGLU (silu, gated)")
        need(m.router in self.routers, "moe.router", f"{arch} routes with {' or '.join(self.routers)}")
        need(bool(self.shared_expert) or not m.shared_d_ff, "moe.shared_d_ff", f"{arch} has no shared experts")
        need(self.gates_shared or not m.shared_gate, "moe.shared_gate", f"{arch} has no gate on its shared experts")
        need(cfg.attention == self.attention, "attention", f"{arch} does not use it")
        need(cfg.qk_norm == self.qk_norm, "qk_norm", f"{arch} does not use it")
        need(cfg.attn_bias == self.attn_bias, "attn_bias", f"{arch} differs")
        need(cfg.attn_out_bias == self.attn_out_bias, "attn_out_bias", f"{arch} differs")
        need(cfg.attn_sinks == self.attn_sinks, "attn_sinks", f"{arch} differs")
        need(cfg.ffn_bias == self.ffn_bias, "ffn_bias", f"{arch} differs")
        need(bool(cfg.swiglu_limit) == self.clamped_swiglu, "swiglu_limit", f"{arch} differs")
        need(m.router_bias == self.learned_router_bias, "moe.router_bias", f"{arch} differs")
        need(self.sliding_windows or not cfg.sliding_window, "sliding_window", f"{arch} attends to every position")
        if not self.first_dense:
            need(cfg.first_dense_layers == 0, "first_dense_layers", f"{arch} has no dense blocks")
        if self.moe_every_block:
            need(cfg.moe_every == 1, "moe_every", f"{arch} has an MoE layer in every block")
        if self.experts_at_d_ff:
            need((m.expert_d_ff or cfg.d_ff) == cfg.d_ff, "moe.expert_d_ff", f"{arch} experts have the model's d_ff")

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        """This family's own ``config.json`` keys, in order (``norm``: the chosen gates are renormalised);
        may refuse with ``need``."""
        raise NotImplementedError

    # ------------------------------------------------------------ tensors
    def tensors(self, cfg: TransformerConfig, interleaved: bool = True) -> list[Tensor]:
        """Every Switchyard variable of ``cfg`` (unrolled layout) with its Hugging Face tensors."""
        t, d = Table(), cfg.d_model
        t.add("embed", "model.embed_tokens.weight", (cfg.vocab_size, d))
        t.add("unembed", "lm_head.weight", (d, cfg.vocab_size), TRANSPOSE)
        t.add("final_norm/scale", "model.norm.weight", (d,))
        for i in range(cfg.num_layers):
            p, b = f"model.layers.{i}", f"blocks/{i}"
            t.add(f"{b}/attn_norm/scale", f"{p}.input_layernorm.weight", (d,))
            t.add(f"{b}/ffn_norm/scale", f"{p}.post_attention_layernorm.weight", (d,))
            self.attention_tensors(t, cfg, f"{b}/attn", f"{p}.self_attn", interleaved)
            if cfg.is_moe_block(i):
                self.moe_tensors(t, cfg, b, f"{p}.{self.moe_module}")
            else:
                t.ffn(f"{b}/ffn", f"{p}.mlp", d, cfg.d_ff)
        return list(t)

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        """The attention's projections: q, k, v and o (``interleaved``: the rotary parts' layout)."""
        d, n, j, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
        t.add(f"{ours}/wq", f"{hf}.q_proj.weight", (d, n, h), _heads_in(n, h))
        t.add(f"{ours}/wk", f"{hf}.k_proj.weight", (d, j, h), _heads_in(j, h))
        t.add(f"{ours}/wv", f"{hf}.v_proj.weight", (d, j, h), _heads_in(j, h))
        t.add(f"{ours}/wo", f"{hf}.o_proj.weight", (n, h, d), _heads_out(n, h))

    def moe_tensors(self, t: Table, cfg: TransformerConfig, b: str, moe: str) -> None:
        """An MoE block ``b`` (its layer ``moe``): the router, the experts stacked, the shared experts."""
        m, d = cfg.moe, cfg.d_model
        f = m.expert_d_ff or cfg.d_ff
        experts = [f"{moe}.experts.{e}" for e in range(m.num_experts)]
        t.add(f"{b}/ffn/router/w", f"{moe}.gate.weight", (d, m.num_experts), TRANSPOSE)
        for ours, name, shape in zip(("wg", "wi", "wo"), self.expert_names, ((d, f), (d, f), (f, d)), strict=True):
            t.add(f"{b}/ffn/{ours}", [f"{x}.{name}.weight" for x in experts], (m.num_experts, *shape), TRANSPOSE)
        if self.router_bias:
            t.add(f"{b}/ffn/router/bias", f"{moe}.gate.{self.router_bias}", (m.num_experts,), item="model_state")
        if m.shared_d_ff:
            t.ffn(f"{b}/shared", f"{moe}.{self.shared_expert}", d, m.shared_d_ff)
            if m.shared_gate:
                t.add(f"{b}/shared_gate", f"{moe}.shared_expert_gate.weight", (d,), _reshape((d,), (1, d)))
