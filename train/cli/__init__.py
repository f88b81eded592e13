"""Command-line entry points, thin: parse, set up the devices, call the library.

moe-train (``train``), moe-eval (``evaluate``), moe-generate (``generate``), moe-bench (``bench``),
moe-plot (``plot``), moe-data (``data``), moe-import and moe-export (``interop``); shared flags, config loading and error handling in ``common``.
"""

from train.cli.bench import bench_main
from train.cli.data import data_main
from train.cli.evaluate import eval_main
from train.cli.generate import generate_main
from train.cli.interop import export_main, import_main
from train.cli.plot import plot_main
from train.cli.train import train_main

__all__ = ["bench_main", "data_main", "eval_main", "export_main", "generate_main", "import_main", "plot_main", "train_main"]
