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
from train.core.optimizer import make_optimizer
from train.core.setup import jit_train_step, probe_graphdef, state_init, state_shardings, with_shardings
from train.core.step import make_eval_step, make_probe_step
from train.services.memory import human_bytes, shard_bytes
from train.services.telemetry import has_probe

GIB = 2**30
OTHER_PROGRAMS = {  # what lowers the programs that run the whole global batch at once
    "evaluation": "it scores the whole global batch at once: a smaller train.batch_size or train.seq_len, or "
                  "model.moe.eval_capacity_factor > 0 (evaluation gives every expert a slot for every token by default)",
    "router probe": "it routes the whole first validation batch at once: router_probe=false, or a smaller "
                    "train.batch_size or train.seq_len",
}


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
    eval_total_bytes: int = 0  # the evaluation program: the whole global batch, forward only
    eval_compile_s: float = 0.0
    probe_total_bytes: int | None = None  # the router probe (None: the run has none)
    probe_compile_s: float | None = None
    device_memory_bytes: int | None = None

    def programs(self) -> dict[str, int]:
        """What each program a run compiles holds per device at its peak."""
        out = {"training step": self.total_bytes, "evaluation": self.eval_total_bytes}
        if self.probe_total_bytes is not None:
            out["router probe"] = self.probe_total_bytes
        return out

    @property
    def peak_bytes(self) -> int:
        return max(self.programs().values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else self.peak_bytes <= self.device_memory_bytes

    def largest_program(self) -> str:
        programs = self.programs()
        return max(programs, key=lambda k: programs[k])

    def biggest(self) -> tuple[str, int, str]:
        """(consumer, bytes, what lowers it) of the largest part of the largest program."""
        name = self.largest_program()
        if name != "training step":
            return name, self.programs()[name], OTHER_PROGRAMS[name]
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
        for key in ("init_compile_s", "eval_compile_s", "probe_compile_s"):
            out[key] = None if out[key] is None else round(out[key], 2)
        out["peak_bytes"] = self.peak_bytes
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
            f"  evaluation        {human_bytes(self.eval_total_bytes):>12} per device at its peak (the whole global "
            f"batch; compile {self.eval_compile_s:.1f} s)",
        ]
        if self.probe_total_bytes is not None:
            out.append(f"  router probe      {human_bytes(self.probe_total_bytes):>12} per device at its peak (the first "
                       f"validation batch; compile {self.probe_compile_s:.1f} s)")
        if self.device_memory_bytes is not None:
            out.append(self._verdict())
        return out

    def _verdict(self) -> str:
        have, peak, largest = human_bytes(self.device_memory_bytes), human_bytes(self.peak_bytes), self.largest_program()
        if self.fits:
            return f"fits: {peak} of {have} per device (the largest program: the {largest})"
        name, size, fix = self.biggest()
        part = f"the {name} ({human_bytes(size)})" if name in OTHER_PROGRAMS else f"{name} ({human_bytes(size)})"
        return f"does not fit: {peak} per device, more than {have}; the biggest part is {part}: {fix}"


def resolved_vocab(cfg: Config) -> Config:
    """The config with the vocabulary the run would have, without reading its data: a prepared
    data folder's tokenizer's, the byte tokenizer's, a tokenizer file's, else ``data.bpe_vocab_size``."""
    if cfg.model.vocab_size:
        return cfg
    from train.data.prepared import is_prepared, open_prepared
    from train.data.tokenizers import BPETokenizer, ByteTokenizer

    if is_prepared(cfg.data.path):
        return with_vocab(cfg, open_prepared(cfg.data.path, f"data.path={cfg.data.path}").tokenizer().vocab_size)
    if cfg.data.tokenizer == "byte":
        return with_vocab(cfg, ByteTokenizer().vocab_size)
    if cfg.data.tokenizer_path:
        from train.data.tokenizers import special_tokens

        return with_vocab(cfg, BPETokenizer.load(cfg.data.tokenizer_path, specials=special_tokens(cfg.data)).vocab_size)
    return with_vocab(cfg, cfg.data.bpe_vocab_size)


def make_plan(cfg: Config, devices=None, device_memory_gb: float | None = None) -> Plan:
    """Compile the programs a run of ``cfg`` compiles on ``devices`` (default: all) from abstract
    shapes: the training step, the parameter initialisation, the evaluation and the router probe."""
    validate(cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_mesh(cfg, len(devices))
    cfg = resolved_vocab(for_backend(cfg, devices[0].platform))
    mesh = make_mesh(devices=devices, **sizes)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    with mesh_and_rules(mesh, cfg.mesh.rules):
        graphdef, eval_graphdef, _, init = state_init(cfg, tx)
        shardings, spread = state_shardings(cfg, jax.eval_shape(init), tx)
        state = with_shardings(jax.eval_shape(init), shardings)
        batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh))
        tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=batch_sharding)
        step = jit_train_step(cfg, graphdef, tx, schedule, shardings, batch_sharding, spread)
        stop = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sharding)
        memory, compile_s = _compiled(step, state, {"inputs": tokens, "targets": tokens}, stop)
        start = time.perf_counter()
        jax.jit(init, out_shardings=shardings).lower().compile()  # what setup runs first
        init_compile_s = time.perf_counter() - start
        evaluation, probe = _eval_and_probe(cfg, eval_graphdef, state, shardings, batch_sharding, tokens)
    params = shard_bytes(state.params)
    grads = params * (2 if cfg.train.grad_accum_steps > 1 else 1)
    limit = None if device_memory_gb is None else int(device_memory_gb * GIB)
    return Plan(
        devices=len(devices), mesh=sizes, params_bytes=params, optimizer_bytes=shard_bytes(state.opt_state),
        model_state_bytes=shard_bytes(state.model_state), gradient_bytes=grads,
        temp_bytes=int(memory.temp_size_in_bytes), total_bytes=_peak(memory),
        flops_per_step=float(flops_per_token(cfg.model, s) * b * s), compile_s=compile_s, init_compile_s=init_compile_s,
        eval_total_bytes=_peak(evaluation[0]), eval_compile_s=evaluation[1],
        probe_total_bytes=None if probe is None else _peak(probe[0]), probe_compile_s=None if probe is None else probe[1],
        device_memory_bytes=limit,
    )


def _eval_and_probe(cfg: Config, eval_graphdef, state, shardings, batch_sharding, tokens):
    """(memory, compile seconds) of the evaluation and of the router probe (None: the run has none),
    jitted as ``train.core.setup`` jits them, on the whole global batch each runs."""
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    in_shardings = (shardings.params, shardings.model_state, batch_sharding)
    weights = jax.ShapeDtypeStruct(tokens.shape, jnp.float32, sharding=batch_sharding)
    eval_step = jax.jit(make_eval_step(eval_graphdef), in_shardings=in_shardings, out_shardings=replicated)
    evaluation = _compiled(eval_step, state.params, state.model_state,
                           {"inputs": tokens, "targets": tokens, "weights": weights})
    if not has_probe(cfg):
        return evaluation, None
    probe_step = jax.jit(make_probe_step(probe_graphdef(cfg)), in_shardings=in_shardings, out_shardings=replicated)
    return evaluation, _compiled(probe_step, state.params, state.model_state, tokens)


def _compiled(fn, *args):
    """(memory analysis, compile seconds) of jitted ``fn`` compiled for abstract ``args``."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled.memory_analysis(), time.perf_counter() - start


def _peak(memory) -> int:
    """What a compiled program holds at its peak: arguments, outputs that do not alias them, temporaries."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)


def parameter_line(cfg: Config) -> str:
    counts = param_counts(resolved_vocab(cfg).model)
    return f"model: {counts['total']:,} parameters, {counts['active']:,} active per token"
