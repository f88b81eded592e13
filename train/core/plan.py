"""``moe-train --plan``: compile the real training step ahead of time for the configured mesh, from
abstract shapes (nothing is allocated, no data is read), and report what one device needs.

Per device: parameters, optimizer state (exactly, shard by shard, from the abstract train state
and its shardings), gradients (the parameters' shards, again twice with accumulation; XLA counts
them among its temporaries), XLA's temporaries (activations kept for the backward pass,
gradients, workspace) and the total the compiled program holds at its peak: its arguments plus
its outputs that do not alias them (the state is donated) plus its temporaries. FLOPs per step
are the model's (``moe.costs``: active parameters and attention, forward and backward), since
XLA's own count sees a scanned body once. On a CPU host the mesh is emulated with that many CPU
devices (``--cpu_devices``), so a 32-GPU job can be planned on a laptop; the temporaries are then
what XLA:CPU's compiler plans, a close guide to, not a copy of, what XLA:GPU/TPU plan.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from moe.costs import flops_per_token, param_counts
from sharding.mesh import make_mesh
from sharding.rules import logical_to_spec, mesh_and_rules
from train.core.config import Config, for_backend, validate, validate_mesh, with_vocab
from train.core.memory import human_bytes, shard_bytes
from train.core.optimizer import make_optimizer
from train.core.setup import jit_train_step, state_init, state_shardings, with_shardings

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one training step needs per device (bytes), its FLOPs and its compile time."""

    devices: int
    mesh: dict
    params_bytes: int
    optimizer_bytes: int
    model_state_bytes: int
    gradient_bytes: int  # included in temp_bytes
    temp_bytes: int
    total_bytes: int
    flops_per_step: float
    compile_s: float
    init_compile_s: float = 0.0  # the parameter initialisation's compile (one scanned pattern)
    device_memory_bytes: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else self.total_bytes <= self.device_memory_bytes

    def biggest(self) -> tuple[str, int, str]:
        """(consumer, bytes, what lowers it) of the largest part of the total."""
        activations = max(self.temp_bytes - self.gradient_bytes, 0)
        parts = {
            "parameters": (self.params_bytes, "more devices on the expert/fsdp axes, or mesh.rules=fsdp"),
            "optimizer state": (self.optimizer_bytes, "more devices on the expert/fsdp axes, or mesh.rules=fsdp"),
            "gradients": (self.gradient_bytes, "more devices on the expert/fsdp axes, or mesh.rules=fsdp"),
            "activations and temporaries": (
                activations, "a smaller train.batch_size or train.seq_len, more train.grad_accum_steps, or model.remat=full"
            ),
        }
        name = max(parts, key=lambda k: parts[k][0])
        return name, parts[name][0], parts[name][1]

    def as_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "device_memory_bytes"}
        out["compile_s"] = round(self.compile_s, 2)
        out["init_compile_s"] = round(self.init_compile_s, 2)
        out["fits"] = self.fits
        out["device_memory_bytes"] = self.device_memory_bytes
        return out

    def lines(self) -> list[str]:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        out = [
            f"plan: {self.devices} devices, mesh {mesh}",
            f"  parameters        {human_bytes(self.params_bytes):>12} per device",
            f"  optimizer state   {human_bytes(self.optimizer_bytes):>12} per device",
            f"  model state       {human_bytes(self.model_state_bytes):>12} per device (router state)",
            f"  gradients         {human_bytes(self.gradient_bytes):>12} per device (within the temporaries)",
            f"  temporaries       {human_bytes(self.temp_bytes):>12} per device (XLA: activations, gradients, workspace)",
            f"  total             {human_bytes(self.total_bytes):>12} per device at the step's peak",
            f"  FLOPs per step    {self.flops_per_step:.3e} (model FLOPs, all devices)",
            f"  compile time      {self.compile_s:.1f} s (initialisation: {self.init_compile_s:.1f} s)",
        ]
        if self.device_memory_bytes is not None:
            have = human_bytes(self.device_memory_bytes)
            if self.fits:
                out.append(f"fits: {human_bytes(self.total_bytes)} of {have} per device")
            else:
                name, size, fix = self.biggest()
                out.append(
                    f"does not fit: {human_bytes(self.total_bytes)} per device, more than {have}; the biggest part is "
                    f"{name} ({human_bytes(size)}): {fix}"
                )
        return out


def resolved_vocab(cfg: Config) -> Config:
    """The config with the vocabulary the run would have, without reading its data: a prepared
    data folder's tokenizer's, the byte tokenizer's, a tokenizer file's, else ``data.bpe_vocab_size``."""
    if cfg.model.vocab_size:
        return cfg
    from train.data.prepared import is_prepared, open_prepared
    from train.data.tokenizers import BPETokenizer, ByteTokenizer

    if is_prepared(cfg.data.path):
        return with_vocab(cfg, open_prepared(cfg.data.path, f"data.path={cfg.data.path}").tokenizer.vocab_size)
    if cfg.data.tokenizer == "byte":
        return with_vocab(cfg, ByteTokenizer().vocab_size)
    if cfg.data.tokenizer_path:
        from train.data.tokenizers import special_tokens

        return with_vocab(cfg, BPETokenizer.load(cfg.data.tokenizer_path, specials=special_tokens(cfg.data)).vocab_size)
    return with_vocab(cfg, cfg.data.bpe_vocab_size)


def make_plan(cfg: Config, devices=None, device_memory_gb: float | None = None) -> Plan:
    """Compile the training step of ``cfg`` on ``devices`` (default: all) from abstract shapes."""
    validate(cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_mesh(cfg, len(devices))
    cfg = resolved_vocab(for_backend(cfg, devices[0].platform))
    mesh = make_mesh(devices=devices, **sizes)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    with mesh_and_rules(mesh, cfg.mesh.rules):
        graphdef, _, _, init = state_init(cfg, tx)
        abstract = jax.eval_shape(init)
        shardings, spread = state_shardings(cfg, abstract, tx)
        abstract = with_shardings(abstract, shardings)
        batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh))
        step = jit_train_step(cfg, graphdef, tx, schedule, shardings, batch_sharding, spread)
        state = abstract
        tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=batch_sharding)
        stop = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sharding)
        start = time.perf_counter()
        compiled = step.lower(state, {"inputs": tokens, "targets": tokens}, stop).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.jit(init, out_shardings=shardings).lower().compile()  # what Trainer runs first
        init_compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    params = shard_bytes(abstract.params)
    grads = params * (2 if cfg.train.grad_accum_steps > 1 else 1)
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    limit = None if device_memory_gb is None else int(device_memory_gb * GIB)
    return Plan(
        devices=len(devices), mesh=sizes, params_bytes=params, optimizer_bytes=shard_bytes(abstract.opt_state),
        model_state_bytes=shard_bytes(abstract.model_state), gradient_bytes=grads,
        temp_bytes=int(memory.temp_size_in_bytes), total_bytes=int(total),
        flops_per_step=float(flops_per_token(cfg.model, s) * b * s), compile_s=compile_s, init_compile_s=init_compile_s,
        device_memory_bytes=limit,
    )


def parameter_line(cfg: Config) -> str:
    counts = param_counts(resolved_vocab(cfg).model)
    return f"model: {counts['total']:,} parameters, {counts['active']:,} active per token"
