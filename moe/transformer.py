"""Decoder-only transformer language model with dense or MoE feed-forward blocks.

Shape letters: see ``moe/__init__.py`` (S query positions, P key positions, N heads, H head dim).

Pre-norm blocks (``moe.blocks``): x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)) where FFN is an
``MoEFeedForward`` in every ``moe_every``-th block and a dense GLU/MLP elsewhere. Causal
multi-head attention with rotary position embeddings (RoPE). With ``model.scan_layers`` the
repeating pattern of blocks runs as one ``jax.lax.scan`` over stacked parameters (``BlockStack``);
``model.remat`` rematerialises each block (``run_block``) or each scanned pattern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.attention import ATTENTION, write_cache
from moe.blocks import Block, DenseFFN, RMSNorm, einsum
from moe.config import TransformerConfig
from moe.dispatch.base import EXCHANGED
from moe.layer import MoEFeedForward
from moe.params import RouterState, compute_value, sharded_param
from moe.routers.base import NO_PREVIOUS_TOKEN
from moe.stats import MoEStats
from sharding.mesh import current_mesh
from sharding.rules import logical_to_spec

__all__ = ["Block", "BlockStack", "DenseFFN", "MoEStats", "RMSNorm", "Transformer", "abstract_model", "build_model",
           "run_block"]


class Transformer(nnx.Module):
    """``logits_BSV, stats = model(tokens_BS)``; ``stats`` (``moe.stats.MoEStats``) sums the MoE
    layers' router losses and averages their statistics. ``model.routes(tokens_BS)``: each MoE
    layer's first expert per token (the router telemetry's probe)."""

    EMBED_AXES = ("vocab", "embed")

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ValueError(f"TransformerConfig.vocab_size={cfg.vocab_size}: must be set (>= 1) to build a model")
        cfg.check()
        self.cfg = cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        self.embed = sharded_param(rngs.params(), (cfg.vocab_size, cfg.d_model), self.EMBED_AXES, 1.0, pdtype)
        repeats = cfg.scan_repeats
        # scanned: blocks before ``first_scanned`` (the dense first layers) in ``head``, the next
        # repeats*period in the stack, the rest in ``blocks``; unrolled: every block in ``blocks``
        first = cfg.first_scanned if repeats else 0
        self.head = nnx.List([Block(cfg, i, rngs=rngs) for i in range(first)])
        self.stack = BlockStack(cfg, repeats, offset=first, rngs=rngs) if repeats else nnx.data(None)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(first + repeats * cfg.period, cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else sharded_param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model**-0.5, pdtype)
        )

    @property
    def first_unscanned(self) -> int:
        """The index of the first block in ``blocks`` (the ones before it are in ``head`` or scanned)."""
        return 0 if self.stack is None else self.stack.offset + self.stack.num_blocks

    def unrolled_blocks(self) -> list[tuple[int, Block]]:
        """``(block index, block)`` of the blocks outside the stack (``head`` and ``blocks``)."""
        return list(enumerate(self.head)) + list(enumerate(self.blocks, self.first_unscanned))

    @property
    def num_moe_layers(self) -> int:
        return self.cfg.num_moe_layers

    def moe_layers(self) -> list[tuple[int, MoEFeedForward]]:
        """``(block index, layer)`` of the unscanned MoE blocks (see ``each_moe_layer`` for all)."""
        return [(i, b.ffn) for i, b in self.unrolled_blocks() if b.is_moe]

    def each_moe_layer(self, fn) -> None:
        """``fn(index, layer)`` for every MoE layer in block order, scanned or not; what ``fn``
        changes in the layer's state is kept (a scanned layer is a view of one repeat)."""
        if self.stack is not None:
            self.stack.each_block(lambda i, block: fn(i, block.ffn) if block.is_moe else None)
        for i, layer in self.moe_layers():
            fn(i, layer)

    @property
    def wants_token_counts(self) -> bool:
        """Whether a router learns from the training split's token counts before training (``fit_routers``)."""
        return bool(self.cfg.moe_every) and self.cfg.moe.router_class.wants_token_counts

    def fit_routers(self, token_counts_V) -> None:
        """Before training: routers that learn from token counts (balanced_hash's table) do."""
        self.each_moe_layer(lambda _, layer: layer.router.fit(token_counts_V))

    def embed_tokens(self, tokens_BS):
        table = compute_value(self.embed, (None, None))  # gathered whole for the lookup
        mesh = current_mesh()
        spec = None if mesh is None else logical_to_spec(("batch", "seq", "act_embed"), mesh)
        x_BSD = table.at[tokens_BS].get(out_sharding=spec)
        return x_BSD.astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x_BSD):
        """float32 logits; the matmul takes the activation dtype with float32 accumulation."""
        x_BSD = self.final_norm(x_BSD)
        dtype, out_axes = x_BSD.dtype, ("batch", "seq", "act_vocab")
        if self.unembed is None:
            table = compute_value(self.embed, self.EMBED_AXES).astype(dtype)
            return einsum("bsd,vd->bsv", x_BSD, table, out_axes, jnp.float32) * self.cfg.d_model**-0.5
        unembed = compute_value(self.unembed, ("embed", "vocab")).astype(dtype)
        return einsum("bsd,dv->bsv", x_BSD, unembed, out_axes, jnp.float32)

    def __call__(self, tokens_BS, positions_BS=None):
        """Training / scoring forward pass: ``logits_BSV, stats``."""
        logits_BSV, stats, _, _ = self.forward(tokens_BS, positions_BS)
        return logits_BSV, stats

    def routes(self, tokens_BS) -> dict:
        """{"layer<i>": [B,S] int32} each MoE block's first expert per token (E where none took it)."""
        return self.forward(tokens_BS)[3]

    def update_router_state(self, stats: MoEStats) -> None:
        """Once per training step: each MoE layer's router state learns from that layer's load
        over the whole step (``stats.per_layer``; see ``MoEFeedForward.update_router_state``)."""
        self.each_moe_layer(lambda i, layer: layer.update_router_state(stats.per_layer[f"layer{i}"].expert_load))

    def decode(self, tokens_BS, positions_BS, cache):
        """Incremental decoding with a KV cache (see ``init_cache``): ``logits_BSV, new_cache``.

        Each call costs the new positions only; the prompt can go in one call (prefill). The MoE
        layers never drop while decoding, so decoding equals the full forward pass without drops
        (it differs from ``moe-eval`` only where ``eval_capacity_factor`` makes that drop).
        """
        logits_BSV, _, cache, _ = self.forward(tokens_BS, positions_BS, cache)
        return logits_BSV, cache

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Each block's empty attention cache in the activation dtype (``moe.attention``: keys and
        values [B, max_len, J, H], or MLA's latent; stacked [R, ...] per pattern position for
        scanned blocks), and the token ids seen so far [B, max_len] (the bigram router reads the
        previous one)."""
        cfg = self.cfg
        mesh = current_mesh()
        batch_spec = None if mesh is None else logical_to_spec(("batch",), mesh)[0]

        def split(x, axis):  # the batch rows over the mesh's batch axes, as the activations
            if mesh is None:
                return x
            return jax.sharding.reshard(x, jax.P(*([None] * axis + [batch_spec] + [None] * (x.ndim - axis - 1))))

        def empty(lead=()):
            leaves = ATTENTION[cfg.attention].empty_cache(cfg, batch, max_len, lead)
            return jax.tree.map(lambda x: split(x, len(lead)), leaves)

        stack = None if self.stack is None else [empty((self.stack.repeats,)) for _ in range(cfg.period)]
        return {"head": [empty() for _ in self.head], "stack": stack, "blocks": [empty() for _ in self.blocks],
                "tokens": split(jnp.zeros((batch, max_len), jnp.int32), 0)}

    def forward(self, tokens_BS, positions_BS=None, cache=None):
        """(logits, ``MoEStats``, the new cache or None, {"layer<i>": first expert per token})."""
        if positions_BS is None:
            b, s = tokens_BS.shape
            positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            mesh = current_mesh()
            if mesh is not None:
                positions_BS = jax.sharding.reshard(positions_BS, logical_to_spec(("batch", "seq"), mesh))
        x_BSD = self.embed_tokens(tokens_BS)
        prev_BS, new_cache = None, None
        if cache is not None:  # the previous token of each new position comes from the cache
            seen_BT = write_cache(cache["tokens"], tokens_BS.astype(jnp.int32), positions_BS)
            prev_BS = jnp.take_along_axis(seen_BT, jnp.maximum(positions_BS - 1, 0), axis=1)
            prev_BS = jnp.where(positions_BS > 0, prev_BS, NO_PREVIOUS_TOKEN)
            new_cache = {"head": [], "stack": None, "blocks": [], "tokens": seen_BT}
        stats = {}
        policy = self.cfg.remat
        for i, block in enumerate(self.head):
            block_cache = None if cache is None else cache["head"][i]
            x_BSD, block_stats, block_cache = run_block(block, policy, x_BSD, positions_BS, tokens_BS, block_cache, prev_BS)
            if cache is not None:
                new_cache["head"].append(block_cache)
            if block_stats is not None:
                stats[i] = block_stats
        if self.stack is not None:
            x_BSD, stats, stack_cache = self.stack(
                x_BSD, positions_BS, tokens_BS, None if cache is None else cache["stack"], prev_BS, policy
            )
            if cache is not None:
                new_cache["stack"] = stack_cache
        for i, block in enumerate(self.blocks, self.first_unscanned):
            block_cache = None if cache is None else cache["blocks"][i - self.first_unscanned]
            x_BSD, block_stats, block_cache = run_block(block, policy, x_BSD, positions_BS, tokens_BS, block_cache, prev_BS)
            if cache is not None:
                new_cache["blocks"].append(block_cache)
            if block_stats is not None:
                stats[i] = block_stats
        moe_stats, routes = MoEStats.combine(stats, self.cfg.moe.num_experts)
        return self.logits(x_BSD), moe_stats, new_cache, routes


def build_model(cfg: TransformerConfig, seed: int = 0) -> Transformer:
    """The model of ``cfg`` as every program builds it: parameters drawn from ``seed``, the random
    routers' streams from ``seed + 1``. Under a mesh, its arrays are created already sharded."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed, routing=seed + 1))


def abstract_model(cfg: TransformerConfig, mode: str = "train", seed: int = 0) -> Transformer:
    """``build_model`` as shapes, dtypes and shardings only (nothing allocated or computed);
    ``mode="eval"``: in evaluation mode (``Transformer.eval``), as evaluation and decoding trace it."""
    if mode not in ("train", "eval"):
        raise ValueError(f"abstract_model: mode={mode!r}: 'train' or 'eval'")
    model = nnx.eval_shape(lambda: build_model(cfg, seed))
    if mode == "eval":
        model.eval()
    return model


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of ``model.remat`` (see ``moe.config.REMAT_POLICIES``)."""
    policies = jax.checkpoint_policies
    exchange = policies.save_only_these_names(EXCHANGED)
    return {
        "full": policies.nothing_saveable,
        "save_dots": policies.checkpoint_dots,
        "save_exchange": exchange,
        "save_dots_exchange": policies.save_from_both_policies(policies.checkpoint_dots, exchange),
    }[name]


def run_block(block: Block, policy: str, *args, layer=None):
    """``block(*args, layer=layer)``, rematerialised by ``policy`` ("none": called as it is).

    Under remat the block runs as a pure function of its state, and the RNG counts it advanced
    (random routers' streams) are written back, so the draws are the same with every policy."""
    if policy == "none":
        return block(*args, layer=layer)
    graphdef, state = nnx.split(block)

    def pure(state, args, layer):
        b = nnx.merge(graphdef, state)
        out = b(*args, layer=layer)
        return out, nnx.state(b, nnx.RngCount)

    out, counts = jax.checkpoint(pure, policy=remat_policy(policy), prevent_cse=False)(state, args, layer)
    nnx.update(block, counts)
    return out


class BlockStack(nnx.Module):
    """Blocks F .. F+R*P-1 (F = ``offset``, the unrolled dense first blocks) as R repeats of the
    block pattern (P = ``cfg.period`` blocks, the last an MoE block when ``moe_every`` = P):
    ``pattern[j]`` is the pattern's j-th block with every variable stacked on a leading ``layers``
    axis [R, ...]; block ``F + r*P + j`` is repeat r of it.

    Built by one ``jax.lax.scan`` over the repeats (initialisation compiles one pattern, whatever
    the depth) that draws from ``rngs`` exactly what building the blocks one by one draws, so a
    scanned model starts from the same parameters as an unscanned one. Run by one ``jax.lax.scan``
    (``__call__``) whose body is one pattern, rematerialised by ``model.remat``.
    """

    def __init__(self, cfg: TransformerConfig, repeats: int, *, offset: int = 0, rngs: nnx.Rngs):
        period = cfg.period
        rng_def, rng_state = nnx.split(rngs)
        built = {}

        def build(rng_state, _):
            r = nnx.merge(rng_def, rng_state)
            pattern = nnx.List([Block(cfg, offset + j, rngs=r) for j in range(period)])
            built["graphdef"], state = nnx.split(pattern)
            return nnx.split(r)[1], state

        rng_state, stacked = jax.lax.scan(build, rng_state, length=repeats)
        nnx.update(rngs, rng_state)
        self.pattern = nnx.merge(built["graphdef"], stacked)
        for _, var in nnx.iter_graph(self.pattern):
            if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
                var.set_metadata("logical_axes", ("layers", *var.get_metadata("logical_axes")))
                if var.has_metadata("out_sharding"):
                    var.set_metadata("out_sharding", (None, *var.get_metadata("out_sharding")))
        self.repeats, self.period, self.offset = repeats, period, offset

    @property
    def num_blocks(self) -> int:
        return self.repeats * self.period

    def each_block(self, fn) -> None:
        """``fn(index, block)`` for every block in order, on a view of its repeat; what ``fn``
        changes in the block's router state (``RouterState``) is written back into the stack."""
        for j, stacked in enumerate(self.pattern):
            graphdef, state = nnx.split(stacked)
            for r in range(self.repeats):
                block = nnx.merge(graphdef, jax.tree.map(lambda v: v[r], state))
                before = jax.tree.leaves(nnx.state(block, RouterState))
                fn(self.offset + r * self.period + j, block)
                after = nnx.state(block, RouterState)
                if all(a is b for a, b in zip(before, jax.tree.leaves(after), strict=True)):
                    continue  # fn changed nothing (a router with no per-step update): no copy of the stack
                whole = nnx.state(stacked, RouterState)
                nnx.update(stacked, jax.tree.map(lambda w, one: w.at[r].set(one), whole, after))

    def __call__(self, x_BSD, positions_BS, token_ids_BS, cache, prev_token_ids_BS, policy: str):
        """(x, {block index: LayerStats} of the MoE blocks, the new stacked cache or None)."""
        graphdefs, states = zip(*(nnx.split(block) for block in self.pattern), strict=True)
        period, offset = self.period, self.offset

        def body(x_BSD, xs):
            states, r, caches = xs
            stats, new_caches, counts = [], [], []
            for j in range(period):
                block = nnx.merge(graphdefs[j], states[j])
                block_cache = None if caches is None else caches[j]
                x_BSD, block_stats, block_cache = block(
                    x_BSD, positions_BS, token_ids_BS, block_cache, prev_token_ids_BS, layer=offset + r * period + j
                )
                stats.append(block_stats)
                new_caches.append(block_cache)
                counts.append(nnx.state(block, nnx.RngCount))
            return x_BSD, (stats, None if caches is None else new_caches, counts)

        if policy != "none":
            body = jax.checkpoint(body, policy=remat_policy(policy), prevent_cse=False)
        xs = (list(states), jnp.arange(self.repeats, dtype=jnp.int32), cache)
        x_BSD, (stats, new_cache, counts) = jax.lax.scan(body, x_BSD, xs)
        for block, count in zip(self.pattern, counts, strict=True):
            nnx.update(block, count)
        out = {}
        for r in range(self.repeats):
            for j, block_stats in enumerate(stats):
                if block_stats is not None:
                    out[offset + r * period + j] = jax.tree.map(lambda a: a[r], block_stats)
        return x_BSD, out, new_cache
