"""Run metrics: one JSONL file, TensorBoard scalars, a console progress bar; FLOPs and MFU.

``MetricsWriter`` appends ``{"step", "split", **metrics}`` to ``workdir/metrics.jsonl`` (one
flushed line per call), mirrors each value to TensorBoard under ``workdir/tensorboard`` and shows
progress on the console. Per-expert values (e.g. ``moe/expert_load`` [E]) are lists in the JSONL
and one scalar per expert plus a histogram in TensorBoard. Only process 0 writes
(``enabled=False`` elsewhere). No JAX here: values arrive as Python or NumPy numbers (anything
with ``__array__`` works), so this module imports without starting a backend.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Console line: (label, keys looked up in order, format). Every key still goes to JSONL/TensorBoard.
_CONSOLE_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("loss", ("loss",), "{:.3f}"),
    ("ppl", ("perplexity", "ppl"), "{:.2f}"),
    ("lr", ("lr", "learning_rate"), "{:.1e}"),
    ("tok/s", ("tokens_per_sec",), "{:,.0f}"),
    ("mfu", ("mfu",), "pct"),
    ("drop", ("moe/dropped_fraction", "dropped_fraction"), "{:.3f}"),
)


def _to_json_value(value: Any) -> Any:
    """Plain Python value for JSON: numbers, (nested) lists, strings; non-finite floats -> None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    arr = np.asarray(value)  # NumPy scalars, 0-d / n-d arrays, JAX arrays via __array__
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return _to_json_value(arr.tolist())
    raise TypeError(f"metric value of type {type(value).__name__} is not a number or list of numbers")


def _summary_writer() -> type:
    """tensorboardX's ``SummaryWriter``, imported without torch: tensorboardX imports torch whenever
    it is installed (1.5 s and its memory at every start) only to accept torch tensors, which a run
    never passes. Where torch is already loaded, nothing changes."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            sys.modules.pop("torch", None)
    return SummaryWriter


class MetricsWriter:
    """JSONL + TensorBoard + console progress for one run; a no-op when ``enabled`` is False."""

    def __init__(
        self,
        workdir: pathlib.Path | str,
        *,
        total_steps: int,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.workdir = pathlib.Path(workdir)
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream  # resolved per run, not at import
        self._closed = False
        self._jsonl: IO[str] | None = None
        self._tb: Any = None  # tensorboardX.SummaryWriter
        self._bar: Any = None  # tqdm.tqdm
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        self._jsonl = open(path, "a", encoding="utf-8")
        if path.stat().st_size and not _ends_with_newline(path):
            self._jsonl.write("\n")  # a killed run left half a line: keep it on its own line
            self._jsonl.flush()
        if tensorboard:
            self._tb = _summary_writer()(logdir=str(self.workdir / TENSORBOARD_DIR))
        if progress is None:
            progress = _is_terminal(self.stream)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, file=self.stream, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ writing
    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Record ``metrics`` at ``step`` for ``split`` ("train", "eval", ...)."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsWriter.write after close()")
        for reserved in ("step", "split"):
            if reserved in metrics:
                raise ValueError(f"metric name {reserved!r} is reserved")
        step = int(step)
        values = {str(k): _to_json_value(v) for k, v in metrics.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, "split": split, **values}, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:  # a metric given as None (not measured yet, e.g. the first tokens/s) is left out
            self._write_tensorboard(step, split, {k: v for k, v in values.items() if metrics[k] is not None})
        if self._bar is not None and split == "train":
            self._bar.update(max(0, step - self._bar.n))
            postfix: dict[str, str] = {}
            if "loss" in values:
                postfix["loss"] = _fmt(values["loss"], "{:.3f}")
            if "tokens_per_sec" in values:
                postfix["tok/s"] = _fmt(values["tokens_per_sec"], "{:,.0f}")
            if postfix:
                self._bar.set_postfix(postfix, refresh=True)
        else:
            self.log(self._console_line(step, split, values))

    def _write_tensorboard(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            tag = f"{split}/{key}"
            if isinstance(value, list):
                try:
                    flat = np.asarray(value, dtype=np.float64).ravel()  # None -> nan
                except (TypeError, ValueError):  # strings or ragged lists: JSONL only
                    continue
                for i, v in enumerate(flat):
                    self._tb.add_scalar(f"{tag}/{i}", float(v), step)
                finite = flat[np.isfinite(flat)]
                if finite.size:
                    self._tb.add_histogram(tag, finite, step)
            elif isinstance(value, (int, float)) or value is None:  # None: a non-finite number, kept as NaN
                self._tb.add_scalar(tag, math.nan if value is None else float(value), step)
        self._tb.flush()

    def _console_line(self, step: int, split: str, values: Mapping[str, Any]) -> str:
        if split == "train":
            width = len(str(self.total_steps))
            head = f"step {step:>{width}}/{self.total_steps}"
        else:
            head = f"{split} step {step}"
            loss = values.get("loss")
            if isinstance(loss, (int, float)) and "perplexity" not in values and "ppl" not in values:
                values = {**values, "perplexity": math.exp(min(loss, 700.0))}
        parts = [head]
        for label, keys, fmt in _CONSOLE_FIELDS:
            key = next((k for k in keys if k in values), None)
            if key is not None and values[key] is not None and not isinstance(values[key], list):
                parts.append(f"{label} {_fmt(values[key], fmt)}")
        return "  ".join(parts)

    def log(self, message: str) -> None:
        """Print a line of text, above the progress bar when there is one; in a multi-process job
        it starts with ``[process i/n]``."""
        if not self.enabled or self._closed:
            return
        from sharding.distributed import prefix

        message = prefix() + message
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush and close the bar, TensorBoard and the JSONL file; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_with_newline(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _fmt(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)):
        return "nan"
    if fmt == "pct":
        return f"{100.0 * value:.1f}%"
    return fmt.format(value)


# ---------------------------------------------------------------------- FLOPs and MFU
NOMINAL_PEAK_FLOPS = 1e11
"""Returned for CPUs and unknown devices: a nominal 100 GFLOP/s per device, so MFU stays defined
(and is only a rough figure); set ``Config.peak_flops_per_device`` for a real one."""

# Dense (no sparsity) peak FLOP/s per JAX device: (device_kind pattern, 16-bit, float32).
# GPUs: the float32 figure is TF32 tensor-core throughput, because XLA runs float32 matmuls at the
# default precision in TF32 on Ampere and newer. TPUs: float32 matmuls at default precision run
# as bfloat16 passes on the MXU, so both figures are the bfloat16 peak. TPU v2/v3 expose each
# core as a device (half a chip); later generations one device per chip. Patterns are tried in
# order (the first match wins) against the lower-cased device_kind.
_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bh100\b.*\bpcie\b", 756e12, 378e12),
    (r"\bh100\b.*\bnvl\b", 835e12, 418e12),
    (r"\bh200\b.*\bnvl\b", 835e12, 418e12),
    (r"\bg?h100\b|\bg?h200\b", 989e12, 495e12),  # SXM, GH200
    (r"\bb200\b", 2250e12, 1125e12),
    (r"\ba100\b", 312e12, 156e12),
    (r"\bl40s\b", 362e12, 183e12),
    (r"\bl4\b", 121e12, 60e12),
    (r"\ba10\b", 125e12, 62.5e12),
    (r"^tpu v2$", 22.5e12, 22.5e12),
    (r"^tpu v3$", 61.5e12, 61.5e12),
    (r"^tpu v4$", 275e12, 275e12),
    (r"^tpu v5 ?lite$|^tpu v5e$", 197e12, 197e12),
    (r"^tpu v5p?$", 459e12, 459e12),  # v5p reports "TPU v5"
    (r"^tpu v6 ?lite$|^tpu v6e$", 918e12, 918e12),
)


def peak_flops_per_device(device_kind: str, dtype: str = "bfloat16") -> float:
    """Dense peak FLOP/s of one device of ``device_kind`` (``jax.Device.device_kind``) in ``dtype``.

    ``dtype`` is the matmul input type: "bfloat16" / "float16" use the 16-bit tensor-core (MXU)
    peak, "float32" the TF32 peak on GPUs and the bfloat16 peak on TPUs. CPUs and unknown kinds
    get ``NOMINAL_PEAK_FLOPS`` (1e11).
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose bfloat16, float16 or float32")
    kind = " ".join(device_kind.lower().split())
    for pattern, half, single in _PEAK_FLOPS:
        if re.search(pattern, kind):
            return single if dtype == "float32" else half
    return NOMINAL_PEAK_FLOPS


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the mesh's peak, as a fraction (0.42 = 42%)."""
    return tokens_per_sec * flops_per_token / (num_devices * peak_per_device)
