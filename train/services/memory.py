"""A cheap pre-flight every run gets: what one training step needs per device, before anything
is allocated or compiled, against the memory the devices have.

Shape letters: B sequences per device per micro-batch, S sequence, D model width, F dense FFN
hidden width, H expert hidden width, N heads, E experts, K experts per token, V vocabulary.

Parameters and optimizer state are counted exactly, shard by shard, from the abstract train
state and its shardings; gradients take the parameters' size (twice with accumulation: the
micro-batch's and the running sum); the update briefly holds the new parameters beside the old
(the state is donated, so the optimizer state is updated in place). Activations are estimated
from the config: what the backward pass keeps per token and layer, plus the logits. On the
configs it was checked on (the default config with 16-64 sequences, 128-512 tokens, 8 dense
layers, 32 experts top-2, bf16) the total came within 0.8-1.1x of XLA's arguments plus
temporaries for the compiled step (``tests/test_workdir.py`` keeps it within 0.6-1.5x). It is a
guard against the clearly impossible, not a plan: a run it accepts may still not fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from train.errors import ConfigError

if TYPE_CHECKING:
    from train.core.config import Config


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes one device needs for a training step, by term."""

    parameters: int
    optimizer: int
    gradients: int
    update: int  # new parameters beside the old ones in the update
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.gradients + self.update + self.activations

    def largest(self) -> tuple[str, int]:
        terms = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        name = max(terms, key=terms.get)
        return name, terms[name]


def shard_bytes(tree) -> int:
    """Bytes of one device's shard of every (abstract) array in ``tree``."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, dtype = leaf.shape, leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, leaf)
            shape, dtype = data.shape, data.dtype
        sharding = getattr(leaf, "sharding", None)
        shard = sharding.shard_shape(shape) if sharding is not None else shape
        total += math.prod(shard) * np.dtype(dtype).itemsize
    return total


def activation_bytes(cfg: Config, batch_shards: int, tensor: int = 1) -> int:
    """What the backward pass keeps for one micro-batch on one device (see the module docstring)."""
    m, t = cfg.model, cfg.train
    b = t.batch_size // t.grad_accum_steps // batch_shards
    tokens = b * t.seq_len
    act = np.dtype(m.dtype).itemsize
    d, n, s, v = m.d_model, m.num_heads // tensor, t.seq_len, max(m.vocab_size, 1)
    glu = 3 if m.gated else 2
    # per token and layer: norms in float32, q/k/v/attention output, float32 scores and probabilities
    attention = 2 * d * 4 + 4 * d * act + 2 * n * s * 4 + 2 * d * act
    dense = (glu * m.d_ff // tensor + d) * act
    e = m.moe
    h = (e.expert_d_ff or m.d_ff) // tensor
    slots = e.experts_per_token * (e.capacity_factor * e.router_class.slot_scale(e) if e.dispatch == "capacity" else 1)
    moe = 3 * e.num_experts * 4 + slots * (3 * d + glu * h) * act + e.experts_per_token * d * 4
    per_block = [attention + (moe if m.is_moe_block(i) else dense) for i in range(m.num_layers)]
    layers = float(sum(per_block))
    if m.remat == "full":  # each block keeps its input; one block's activations are rebuilt at a time
        layers = m.num_layers * d * act + max(per_block)
    logits = 3 * v // tensor * 4  # float32 logits, their log-softmax and gradient
    return int(tokens * (layers + logits))


def step_memory(cfg: Config, abstract_state, batch_shards: int, tensor: int = 1) -> StepMemory:
    params = shard_bytes(abstract_state.params)
    optimizer = shard_bytes(abstract_state.opt_state)
    grads = params * (2 if cfg.train.grad_accum_steps > 1 else 1)
    return StepMemory(params, optimizer, grads, params, activation_bytes(cfg, batch_shards, tensor))


def device_memory(devices) -> tuple[int | None, str]:
    """(bytes one device can use, how that was found); None when the devices do not say."""
    device = devices[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    if device.platform == "cpu":
        available = _host_available_bytes()
        if available is None:
            return None, ""
        local = sum(1 for d in devices if d.process_index == device.process_index)
        return available // local, f"the {human_bytes(available)} of host memory available, shared by {local} CPU device(s)"
    return None, ""


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(cfg: Config, need: StepMemory, devices) -> None:
    """``ConfigError`` in one line when ``need`` exceeds what a device has."""
    have, where = device_memory(devices)
    if have is None or need.total <= have:
        return
    name, size = need.largest()
    terms = ", ".join(f"{f.name} {human_bytes(getattr(need, f.name))}" for f in dataclasses.fields(need))
    if name == "activations":
        field = f"config.train.batch_size={cfg.train.batch_size}"
        fix = "use a smaller train.batch_size or train.seq_len, or more train.grad_accum_steps"
    else:
        field = "config.model"
        fix = "use a smaller model, more devices, or mesh.rules=fsdp to shard parameters and optimizer state"
    raise ConfigError(
        f"{field}: a training step needs about {human_bytes(need.total)} per device ({terms}; {name} the largest), "
        f"more than the {human_bytes(have)} each device has ({where}); {fix}, or pass --skip_memory_check"
    )


def human_bytes(n: float) -> str:
    """1.5 GiB, 12.0 MiB, 300 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.0f} KiB"
