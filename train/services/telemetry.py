"""Router health from a fixed probe batch: routing churn and H(expert | token id) per MoE layer.

Shape letters: L MoE layers, B batch, S sequence, E experts, V vocabulary.

At every logged step the trainer routes one fixed batch (the first validation batch, in
evaluation mode, so router jitter and random draws are off) and reads back each MoE layer's
top-1 expert per token. From those ids:

* ``moe/layer<i>/churn``: the share of the probe's tokens whose top-1 expert changed since the
  previous logged step (absent at the first probe of a process: nothing to compare with). A
  router that keeps moving tokens between experts trains every expert on a moving token set
  (StableMoE's routing fluctuation); a hash router has churn 0 by construction.
* ``moe/layer<i>/token_entropy``: the conditional entropy H(expert | token id) in nats over the
  probe's tokens, sum over ids t of p(t) H(expert | t). 0 when every occurrence of a token id
  goes to one expert (a token-level router: hash, a distilled StableMoE router); it grows as the
  router uses the context. Measured on one batch, so rare ids pull it down a little.
* ``moe/churn`` and ``moe/token_entropy``: their means over the MoE layers.

The probe is one forward pass (``train.core.step.make_probe_step``, compiled before training, with
the training capacity: which experts a router chooses does not depend on it) and a [L, B, S]
int32 read-back per logged step. Stochastic routers (random, thor) draw experts afresh every
training step by design, so they get no probe.
"""

from __future__ import annotations

import numpy as np


def token_entropy(expert_BS: np.ndarray, tokens_BS: np.ndarray, num_experts: int) -> float:
    """H(expert | token id) in nats from paired ids (an id >= num_experts counts as one more
    outcome: an assignment nobody took)."""
    tokens = np.asarray(tokens_BS, np.int64).ravel()
    experts = np.minimum(np.asarray(expert_BS, np.int64).ravel(), num_experts)
    width = num_experts + 1
    joint = np.bincount(tokens * width + experts, minlength=(int(tokens.max()) + 1) * width).reshape(-1, width)
    per_token = joint.sum(axis=1, keepdims=True)
    seen = joint > 0
    p_given = np.where(seen, joint / np.maximum(per_token, 1), 1.0)
    return float(-np.sum(joint[seen] * np.log(p_given[seen])) / tokens.size)


def churn(expert_BS: np.ndarray, previous_BS: np.ndarray) -> float:
    """Share of tokens whose expert differs between two routings of the same batch."""
    return float(np.mean(np.asarray(expert_BS) != np.asarray(previous_BS)))


class RoutingProbe:
    """Keeps the probe batch and the last probe's routes; ``metrics(routes)`` gives a row's keys.

    ``tokens_BS``: the probe's input token ids (the whole global batch, on every process);
    ``mask_BS``: the positions that count (a short validation split pads the batch; default all);
    ``routes`` (from the probe step): {"layer<i>": [B, S] top-1 ids}.
    """

    def __init__(self, tokens_BS: np.ndarray, num_experts: int, mask_BS: np.ndarray | None = None):
        self.mask = np.ones(np.shape(tokens_BS), bool) if mask_BS is None else np.asarray(mask_BS, bool)
        self.tokens_BS = np.asarray(tokens_BS)[self.mask]
        self.num_experts = num_experts
        self.previous: dict[str, np.ndarray] = {}

    def metrics(self, routes: dict[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        churns, entropies = [], []
        for layer in sorted(routes, key=lambda n: int(n.removeprefix("layer"))):
            ids = np.asarray(routes[layer])[self.mask]
            entropies.append(token_entropy(ids, self.tokens_BS, self.num_experts))
            out[f"moe/{layer}/token_entropy"] = entropies[-1]
            if layer in self.previous:
                churns.append(churn(ids, self.previous[layer]))
                out[f"moe/{layer}/churn"] = churns[-1]
            self.previous[layer] = ids
        if entropies:
            out["moe/token_entropy"] = float(np.mean(entropies))
        if churns:
            out["moe/churn"] = float(np.mean(churns))
        return out


def has_probe(cfg) -> bool:
    """Whether a run of ``cfg`` (a run config) routes a fixed batch for router telemetry: MoE layers
    with a router that is not stochastic, and ``router_probe`` on."""
    return bool(cfg.router_probe and cfg.model.moe_every and not cfg.model.moe.router_class.stochastic)
