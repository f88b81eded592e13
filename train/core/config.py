"""Typed run configuration: dataclasses, command-line overrides, validation.

A config file ``configs/NAME.py`` defines ``get_config() -> Config``. The command line
overrides any field with ``--config.section.key=value`` (top-level fields: ``--config.key=value``);
an unknown key is an error. ``validate`` checks the resolved config before JAX starts, raising
``ConfigError`` whose message names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys

from moe.config import MoEConfig, TransformerConfig as ModelConfig
from moe.fields import FieldError, StrictFields, flagged_keys, resumable
from moe.grouped_matmul import resolve as resolve_grouped_matmul, tokamax_available
from train.data.config import DataConfig
from train.errors import ConfigError


@dataclasses.dataclass
class MeshConfig(StrictFields):
    data: int = 2
    fsdp: int = 1
    expert: int = 4
    tensor: int = 1
    rules: str = "ep"  # sharding preset: dp, fsdp, ep, ep+tp, fsdp+tp (see sharding/rules.py); tensor > 1 needs a +tp one


@dataclasses.dataclass
class TrainConfig(StrictFields):
    steps: int = resumable(300)
    batch_size: int = 16  # global sequences per step
    seq_len: int = 128
    seed: int = 0
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide evenly)
    max_nonfinite_steps: int = resumable(3)  # stop after this many consecutive skipped (non-finite) updates
    spike_sigma: float = resumable(0.0)  # skip an update whose loss exceeds mean + sigma * std of the last window (0 = off)
    spike_window: int = 50
    step_timeout_s: float = resumable(0.0)  # multi-process: stop if a step makes no progress this long (0 = 900 s there, off alone)
    # a workdir (e.g. from moe-import) whose latest checkpoint's parameters start this run (fine-tuning);
    # its tokenizer.json is used when the run has none. Ignored once this run has a checkpoint of its own.
    init_from: str = resumable("")


@dataclasses.dataclass
class OptimizerConfig(StrictFields):
    learning_rate: float = 3e-3  # peak
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at train.steps
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 = no clipping
    # ZeRO-1: split each parameter's Adam moments, and the update computed from them, over the mesh
    # axes the parameter is replicated on (data, fsdp, expert, tensor); the new parameters are
    # gathered back. The same numbers, less optimizer memory and update work per device.
    sharded_state: bool = False


@dataclasses.dataclass
class CheckpointConfig(StrictFields):
    every_steps: int = 100  # 0 = only at the end
    keep: int = 3


@dataclasses.dataclass
class Config(StrictFields):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = resumable(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = resumable(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = resumable(default_factory=CheckpointConfig)
    log_every_steps: int = resumable(10)
    eval_every_steps: int = resumable(100)  # 0 = only at the end
    eval_batches: int = resumable(8)  # validation batches per evaluation
    peak_flops_per_device: float = resumable(0.0)  # for MFU; 0 = guess from the device kind
    profile_steps: int = resumable(0)  # > 0: jax.profiler trace of this many steps after warm-up into WORKDIR/profile
    router_probe: bool = resumable(True)  # log routing churn and H(expert | token id) per MoE layer (train.services.telemetry)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------- loading and overrides
def load_config_file(path: str) -> Config:
    """A ``configs/*.py`` file's ``get_config()``, or a run's saved ``config.json`` (e.g. an imported model's)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--config={path}: no such file")
    if file.suffix == ".json":
        try:
            return from_dict(json.loads(file.read_text()))
        except ValueError as e:
            raise ConfigError(f"--config={path}: not a saved config ({str(e).splitlines()[0][:200]})") from None
    spec = importlib.util.spec_from_file_location(f"switchyard_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # a config may import its sibling configs
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is a user error
        raise ConfigError(f"--config={path}: failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(file.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={path}: defines no get_config()")
    try:
        cfg = module.get_config()
    except Exception as e:  # e.g. a misspelt field (StrictFields)
        raise ConfigError(f"--config={path}: get_config() failed: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, Config):
        raise ConfigError(f"--config={path}: get_config() must return train.core.config.Config")
    return cfg


def _coerce(key: str, text: str, annotation):
    """Parse ``text`` into the field's declared type (annotations are strings here)."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(annotation), str)
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"config.{key}={text!r}: expected {name}") from None


def apply_override(cfg: Config, key: str, text: str) -> None:
    """Set ``config.<key>`` (dotted) from its command-line text."""
    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            moved = MOVED.get(".".join(parts[: i + 1]))
            hint = f"; it is {' and '.join(f'config.{m}' for m in moved)} now" if moved else f" ({where} has: {', '.join(fields)})"
            raise ConfigError(f"config.{key}: unknown key{hint}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config.{key}: is a section; set one of its keys")
            setattr(obj, part, _coerce(key, text, fields[part].type))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config.{key}: {'.'.join(parts[: i + 1])} is not a section")


def _moved() -> dict[str, tuple[str, ...]]:
    """Keys of configs saved before a field moved -> today's: model fields that moved into their own
    section ``model.moe``, then a router's own settings into its ``model.moe.router_options`` section
    (declared on the router's options, ``moe.fields.formerly``; a shared seed goes to each router's)."""
    out = {f"model.moe.{old}": tuple(f"model.moe.{new}" for new in news) for old, news in MoEConfig.moved().items()}
    for name in ("num_experts", "experts_per_token", "expert_d_ff", "router", "dispatch", "capacity_factor",
                 "capacity_priority", "eval_capacity_factor", "capacity_group_size", "aux_loss_coef", "z_loss_coef",
                 "router_jitter", "hash_seed", "gshard_threshold", "loss_free_gamma", "thor_consistency"):
        out[f"model.{name}"] = out.get(f"model.moe.{name}", (f"model.moe.{name}",))
    return out


# The one translation of saved configs (``upgrade``); the command line names the new key of an old one.
MOVED = _moved()


def upgrade(data: dict) -> dict:
    """A saved config dict in today's layout (see ``MOVED``)."""
    flat = {new: value for key, value in _flatten(data).items() for new in MOVED.get(key, (key,))}
    out: dict = {}
    for key, value in flat.items():
        node = out
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def from_dict(data: dict) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a saved config.json), any version."""
    cfg = Config()
    for key, value in _flatten(upgrade(data)).items():
        apply_override(cfg, key, str(value))
    return cfg


# ---------------------------------------------------------------- validation
def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Check every field; with ``num_devices`` also the mesh and batch against the devices."""

    def need(cond, key, why):
        if not cond:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config.{key}={value!r}: {why}")

    m, t, o, d = cfg.model, cfg.train, cfg.optimizer, cfg.data
    _check_section("model", m)  # the model's own rules (moe.config)
    need(m.moe.grouped_matmul != "tokamax" or tokamax_available(), "model.moe.grouped_matmul", "tokamax is not installed (pip install 'switchyard[gpu]')")
    for key in ("steps", "batch_size", "seq_len", "grad_accum_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", "must be >= 1")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(t.spike_sigma >= 0, "train.spike_sigma", "must be >= 0 (0 = off)")
    need(t.spike_window >= 2, "train.spike_window", "must be >= 2")
    need(t.step_timeout_s >= 0, "train.step_timeout_s", "must be >= 0")
    need(t.batch_size % t.grad_accum_steps == 0, "train.batch_size", f"must be divisible by train.grad_accum_steps={t.grad_accum_steps}")
    need(o.learning_rate > 0 and math.isfinite(o.learning_rate), "optimizer.learning_rate", "must be > 0")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(0 <= o.b1 < 1, "optimizer.b1", "must be in [0, 1)")
    need(0 <= o.b2 < 1, "optimizer.b2", "must be in [0, 1)")
    need(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0 = off)")
    _check_section("data", d)
    if t.init_from:
        need((pathlib.Path(t.init_from) / "checkpoints").is_dir(), "train.init_from", "no checkpoints folder there")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    need(cfg.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")
    need(cfg.eval_batches >= 1, "eval_batches", "must be >= 1")
    need(cfg.peak_flops_per_device >= 0, "peak_flops_per_device", "must be >= 0")
    need(type(cfg.profile_steps) is int and cfg.profile_steps >= 0, "profile_steps", "must be an integer >= 0 (0 = off)")
    from sharding.rules import PRESETS

    need(cfg.mesh.rules in PRESETS, "mesh.rules", f"choose one of {', '.join(PRESETS)}")
    if num_devices is not None:
        validate_mesh(cfg, num_devices)


def _check_section(section: str, part) -> None:
    """Run a section's own ``check()``; its ``FieldError`` becomes the one-line ``config.SECTION.FIELD=...``."""
    try:
        part.check()
    except FieldError as e:
        raise ConfigError(f"config.{section}.{e.field}={e.value!r}: {e.why}") from None


def validate_mesh(cfg: Config, num_devices: int) -> dict[str, int]:
    """Resolve the mesh against ``num_devices``; check divisibility of experts and batch."""
    from sharding.mesh import resolve_axis_sizes

    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "expert", "tensor")}
    try:
        sizes = resolve_axis_sizes(sizes, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    m, t = cfg.model, cfg.train
    if m.moe_every and m.moe.num_experts % sizes["expert"]:
        raise ConfigError(f"config.model.moe.num_experts={m.moe.num_experts}: not divisible by mesh.expert={sizes['expert']}")
    if sizes["tensor"] > 1:
        from sharding.rules import PRESETS, TENSOR_AXIS

        if TENSOR_AXIS not in PRESETS[cfg.mesh.rules].values():
            raise ConfigError(
                f"config.mesh.tensor={sizes['tensor']}: mesh.rules={cfg.mesh.rules} shards nothing over the tensor "
                "axis, so its devices would all repeat the same work; use mesh.rules=ep+tp or fsdp+tp, or mesh.tensor=1"
            )
        for key in ("d_ff", "num_heads", "num_kv_heads"):
            if getattr(m, key) % sizes["tensor"]:
                raise ConfigError(f"config.model.{key}={getattr(m, key)}: not divisible by mesh.tensor={sizes['tensor']}")
        if m.moe_every and m.moe.expert_d_ff % sizes["tensor"]:
            raise ConfigError(f"config.model.moe.expert_d_ff={m.moe.expert_d_ff}: not divisible by "
                              f"mesh.tensor={sizes['tensor']}")
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = t.batch_size // t.grad_accum_steps
    if micro % shards:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size}: each micro-batch ({micro} sequences) must split evenly "
            f"over data x fsdp x expert = {shards} devices"
        )
    local_tokens = micro // shards * t.seq_len
    group = m.moe.capacity_group_size
    if m.moe_every and group and local_tokens % group:
        raise ConfigError(
            f"config.model.moe.capacity_group_size={group}: must divide the {local_tokens} tokens each "
            f"device holds per micro-batch ({micro // shards} sequences of {t.seq_len})"
        )
    return sizes


def with_vocab(cfg: Config, vocab_size: int) -> Config:
    """The config with the model's vocabulary filled in from the tokenizer (rounded up to 64)."""
    if cfg.model.vocab_size:
        if cfg.model.vocab_size < vocab_size:
            raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size}: the tokenizer needs {vocab_size}")
        return cfg
    model = dataclasses.replace(cfg.model, vocab_size=-(-vocab_size // 64) * 64)
    return dataclasses.replace(cfg, model=model)


def for_backend(cfg: Config, backend: str, environ=None) -> Config:
    """The config as this backend runs it: dropless exchanges with ``ragged_all_to_all`` on GPU/TPU
    (``SWITCHYARD_RAGGED_EXCHANGE=0``: the dense exchange); ``grouped_matmul="auto"`` resolved."""
    environ = os.environ if environ is None else environ
    ragged = backend in ("gpu", "cuda", "rocm", "tpu") and environ.get("SWITCHYARD_RAGGED_EXCHANGE", "") != "0"
    kernel = resolve_grouped_matmul(cfg.model.moe.grouped_matmul, backend)
    moe = dataclasses.replace(cfg.model.moe, ragged_exchange=ragged, grouped_matmul=kernel)
    return cfg if moe == cfg.model.moe else dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


# The fields and sections a resumed run may change (declared ``resumable`` where they are defined);
# anything else must match the checkpoint.
RESUMABLE = flagged_keys(Config(), "resumable")


def as_asked(cfg: Config, asked: Config) -> Config:
    """``cfg`` with the fields the program resolves for its backend (``resumable(run_time=True)``:
    the grouped-matmul kernel, the ragged exchange) as ``asked`` had them: the config a run saves,
    so that another backend resolves them for itself."""
    out = copy.deepcopy(cfg)
    for key in flagged_keys(cfg, "run_time"):
        *path, name = key.split(".")
        src, dst = asked, out
        for part in path:
            src, dst = getattr(src, part), getattr(dst, part)
        setattr(dst, name, getattr(src, name))
    return out


def check_compatible(meta: dict, saved: dict, where: pathlib.Path) -> None:
    """Refuse to resume when the model shape, the data or the batching differ from the checkpoint."""
    if saved.get("data_fingerprint") != meta["data_fingerprint"]:
        raise ConfigError(f"config.data: the data differ from those of the checkpoint {where}; use a new --workdir")
    now, then = _flatten(upgrade(meta["config"])), _flatten(upgrade(saved.get("config", {})))
    defaults = _flatten(Config().to_dict())  # a field the checkpoint predates had its default value then
    options, used = "model.moe.router_options.", f"model.moe.router_options.{now.get('model.moe.router')}."
    for key in sorted(set(now) | set(then)):
        if key.startswith(RESUMABLE) or now.get(key) == then.get(key, defaults.get(key)):
            continue
        if key.startswith(options) and not key.startswith(used):  # another router's options: never read
            continue
        raise ConfigError(
            f"config.{key}={now.get(key)!r}: differs from the checkpoint {where} ({then.get(key)!r}); "
            "resume with the same value or use a new --workdir"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
