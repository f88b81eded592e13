"""A naive single-device reference for the MoE layer: a Python loop over groups and experts.

It shares nothing with moe/dispatch.py: routing decisions are taken in NumPy, capacity is
applied by walking each group's assignments in (choice, token) order, and each expert's
kept tokens go through that expert's FFN one expert at a time.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from moe.routers.hashing import NO_PREVIOUS_TOKEN, bigram_ids, hash_scores


def _act(name):
    return {"gelu": lambda v: jax.nn.gelu(v, approximate=False), "silu": jax.nn.silu, "relu": jax.nn.relu}[name]


def oracle_routing(cfg, params, x, token_ids, key=None, deterministic=False, num_groups=1):
    """NumPy expert ids [T,K] for global tokens in (batch, seq) order (expert_choice: [T,E],
    slot e = e if expert e took the token, else E)."""
    t = x.shape[0] * x.shape[1]
    k, e = cfg.experts_per_token, cfg.num_experts
    if cfg.router == "thor" and not deterministic:  # the documented draw: one expert for all tokens
        return np.full((t, 1), int(jax.random.randint(key, (), 0, e)), np.int64)
    if cfg.router == "expert_choice":  # per group and expert, the C best tokens (ties: earlier token)
        logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), params["router_w"]).reshape(t, e)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        tg = t // num_groups
        c = cfg.capacity(tg, deterministic, always=True)  # expert choice always takes its capacity
        ids = np.full((t, e), e, np.int64)
        for g in range(num_groups):
            for j in range(e):
                ids[g * tg + np.argsort(-probs[g * tg:(g + 1) * tg, j], kind="stable")[:c], j] = j
        return ids
    if cfg.router in ("topk", "frozen", "gshard", "loss_free"):
        logits = np.asarray(jnp.einsum("bsd,de->bse", x.astype(jnp.float32), params["router_w"])).reshape(t, e)
        logits = logits + np.asarray(params.get("router_b", 0.0))[None]
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        if cfg.router == "loss_free":  # selection by probability + bias
            probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
            top = np.argsort(-(probs + np.asarray(params["expert_bias"])), axis=-1, kind="stable")[:, :k]
        if cfg.router == "gshard":  # the documented rule: second expert iff u < g2 / threshold
            probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
            g = np.take_along_axis(probs, top, axis=1)
            g2 = g[:, 1] / g.sum(axis=1)
            b, s = x.shape[:2]
            rows, positions = np.divmod(np.arange(b * s), s)
            draw = jax.jit(jax.vmap(lambda r, p: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, r), p), (1,))))
            u = np.asarray(draw(rows, positions))[:, 0]
            top[:, 1] = np.where(u < g2 / cfg.router_options.gshard.threshold, top[:, 1], e)
        return top
    if cfg.router == "hash":
        scores = np.asarray(hash_scores(jnp.asarray(token_ids), e, cfg.router_options.hash.seed)).reshape(t, e)
    elif cfg.router == "balanced_hash":  # the layer's table, looked up by hand
        return np.asarray(params["hash_table"])[np.asarray(token_ids).reshape(t)]
    elif cfg.router == "bigram_hash":  # previous token by hand: the row's preceding id, or none
        tokens = np.asarray(token_ids)
        prev = np.full_like(tokens, NO_PREVIOUS_TOKEN)
        prev[:, 1:] = tokens[:, :-1]
        seed = cfg.router_options.bigram_hash.seed
        scores = np.asarray(hash_scores(bigram_ids(jnp.asarray(prev), jnp.asarray(tokens)), e, seed)).reshape(t, e)
    else:
        b, s = x.shape[:2]  # the documented rule: token (b, s) draws from fold_in(fold_in(key, b), s)
        rows, positions = np.divmod(np.arange(b * s), s)
        draw = jax.jit(jax.vmap(lambda r, p: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, r), p), (e,))))
        scores = np.asarray(draw(rows, positions))
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def kept_assignments(ids, num_groups, capacity, num_experts, priority="token"):
    """Per expert, the list of kept (token, choice) pairs; the number dropped. Each group's
    assignments claim slots token by token (``priority="token"``: a token's first choice, then
    its second) or every first choice before any second (``"choice"``, GShard's order)."""
    t, k = ids.shape
    tg = t // num_groups
    kept = {e: [] for e in range(num_experts)}
    dropped = 0
    for g in range(num_groups):
        used = [0] * num_experts
        tokens = range(g * tg, (g + 1) * tg)
        if priority == "token":
            order = [(tok, j) for tok in tokens for j in range(k)]
        else:
            order = [(tok, j) for j in range(k) for tok in tokens]
        for tok, j in order:
            e = int(ids[tok, j])
            if e == num_experts:  # no expert: not an assignment
                continue
            if used[e] < capacity:
                kept[e].append((tok, j))
                used[e] += 1
            else:
                dropped += 1
    return kept, dropped


def make_oracle(cfg, ids, num_groups, capacity, gate_ids=None):
    """Returns f(params, x) -> (y, router_loss, dropped_fraction) with routing fixed to ``ids``.

    ``gate_ids``: the top-k experts whose probabilities make the gates (gshard: the top two,
    including an unused second choice, whose gate is then zeroed)."""
    kept, dropped = kept_assignments(ids, num_groups, capacity, cfg.num_experts, cfg.capacity_priority)
    gate_ids = ids if gate_ids is None else gate_ids
    routed = int(np.sum(ids < cfg.num_experts))
    t, k = ids.shape
    act = _act(cfg.activation)

    def f(params, x):
        b, s, d = x.shape
        x_td = x.reshape(t, d)
        router_loss = jnp.zeros((), jnp.float32)
        if cfg.router == "expert_choice":  # gate: the chosen expert's probability; no balance loss
            logits = (x_td.astype(jnp.float32) @ params["router_w"]).astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            gates = jnp.where(ids < cfg.num_experts, probs, 0.0)
            router_loss = cfg.z_loss_coef * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
        elif cfg.router in ("topk", "frozen", "gshard", "loss_free"):
            logits = (x_td.astype(jnp.float32) @ params["router_w"]).astype(jnp.float32)
            if "router_b" in params:
                logits = logits + params["router_b"][None]
            probs = jax.nn.softmax(logits, axis=-1)
            gates = probs[np.arange(t)[:, None], gate_ids]
            if k > 1:
                gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
            gates = jnp.where(ids < cfg.num_experts, gates, 0.0)
            balanced_ids = ids[:, :1] if cfg.router == "gshard" else ids  # GShard: first choices
            load = np.zeros(cfg.num_experts)
            for e in balanced_ids.reshape(-1):
                load[e] += 1
            load /= balanced_ids.size
            aux = cfg.num_experts * jnp.sum(load * jnp.mean(probs, axis=0)) * (cfg.router != "loss_free")
            z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
            router_loss = cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        else:
            gates = jnp.full((t, k), 1.0 / k)
        y = jnp.zeros((t, d), jnp.float32)
        for e in range(cfg.num_experts):  # the naive per-expert loop
            # each expert's kept tokens, padded to all t tokens with weight 0, so that every
            # expert and every test case runs the same shapes (eager ops compile once)
            toks = np.zeros(t, np.int64)
            choice = np.zeros(t, np.int64)
            live = np.zeros(t, np.float32)
            for i, (tok, j) in enumerate(kept[e]):
                toks[i], choice[i], live[i] = tok, j, 1.0
            xe = x_td[toks]
            bias = {n: params[n][e][None] if n in params else 0.0 for n in ("bi", "bg", "bo")}
            h = xe @ params["wi"][e] + bias["bi"]
            if cfg.gated and cfg.swiglu_limit:  # GPT-OSS: clamped, (up + 1) * gate * sigmoid(alpha * gate)
                g = jnp.minimum(xe @ params["wg"][e] + bias["bg"], cfg.swiglu_limit)
                h = jnp.clip(h, -cfg.swiglu_limit, cfg.swiglu_limit)
                h = (h + 1) * g * jax.nn.sigmoid(cfg.swiglu_alpha * g)
            else:
                h = act(xe @ params["wg"][e] + bias["bg"]) * h if cfg.gated else act(h)
            out = h @ params["wo"][e] + bias["bo"]
            y = y.at[toks].add((live * gates[toks, choice])[:, None] * out)
        if cfg.router == "expert_choice":  # its "drops": tokens that no expert took
            return y.reshape(b, s, d), router_loss, float(np.mean(np.all(ids == cfg.num_experts, axis=1)))
        return y.reshape(b, s, d), router_loss, dropped / routed

    return f
