"""Every test runs on CPU with 8 emulated devices (set before JAX starts its backend)."""

import os

os.environ["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
# The suite compiles hundreds of small programs and runs each a few steps: at LLVM's optimisation
# level 0 XLA:CPU compiles them in about half the time (XLA's own HLO passes all still run, so each
# program computes the same operations; only the machine code is less optimised).
# Set SWITCHYARD_TEST_XLA_OPT=3 (or any level) to test with optimised code.
_level = os.environ.get("SWITCHYARD_TEST_XLA_OPT", "0")
if not any("xla_backend_optimization_level" in f for f in _flags):
    _flags.append(f"--xla_backend_optimization_level={_level}")
# XLA:CPU up to jaxlib 0.10 still has its elemental IR emitter beside the newer fusion emitters: it
# emits the same fused HLO with about 40% less compile time. (Later XLA:CPU has only the new ones.)
if _level == "0" and not any("xla_cpu_use_fusion_emitters" in f for f in _flags):
    from importlib.metadata import version as _version

    if tuple(int(x) for x in _version("jaxlib").split(".")[:2]) < (0, 11):
        _flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
# Implicit rank promotion ([B, S] + [S] silently broadcasting) hides shape mistakes: make it an error,
# here and in every moe-train/moe-eval subprocess a test starts.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
# One persistent compilation cache per test session, shared by the xdist workers (they inherit the
# controller's environment) and every moe-train/moe-eval subprocess: a program compiled once in the
# session (the same tiny config's step, over and over) is loaded, not compiled again. Fresh per
# session, so each run still compiles everything once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="switchyard-test-jax-cache-")
# Every program, however quickly it compiled (JAX keeps only those over 1 s by default, and at level
# 0 most of the suite's small programs compile faster): the moe-train processes the tests start load
# their initialisation, evaluation and probe programs instead of compiling them again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from sharding import make_mesh  # noqa: E402

# Tests about what differs between the two stacks `make test` runs (Python, JAX/jaxlib, Flax, NumPy and
# tokamax; Orbax, optax, transformers and ml_dtypes are pinned alike): the second lane runs only these.
stack = pytest.mark.stack


def on_both_stacks(values, *chosen):
    """``values`` for ``parametrize``, the ``chosen`` ones marked ``stack`` (run in both lanes); a tuple
    is one value per argument name."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=stack) if v in chosen else v for v in values]


MESHES = {
    "none": None,  # no mesh set at all
    "1dev": dict(data=1, expert=1),  # a 1-device mesh
    "d2e4": dict(data=2, expert=4),
    "d1e8": dict(data=1, expert=8),
    "d8e1": dict(data=8, expert=1),  # several devices, an expert axis of size 1
    "e4t2": dict(expert=4, tensor=2),
}


def build_mesh(name):
    sizes = MESHES[name]
    if sizes is None:
        return None
    n = 1
    for v in sizes.values():
        n *= v
    return make_mesh(devices=jax.devices()[:n], **sizes)


# The files that take longest (summed --durations of each lane, a fresh clone's make test), started
# first: each worker runs whole files (--dist loadfile), so a long file started last would leave the
# other workers idle at the end.
LONGEST_FIRST = ("test_scan.py", "test_failures.py", "test_multiprocess.py", "test_moe_oracle.py", "test_interop.py",
                 "test_train.py", "test_families.py", "test_routers.py", "test_causality.py", "test_grouped_matmul.py",
                 "test_bench_cli.py", "test_checkpoint.py", "test_plan.py", "test_stack.py", "test_interrupts.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 emulated CPU devices"


def child_env(**extra) -> dict:
    """The environment for a command a test starts: the suite's compiler settings and cache, but not
    its device count (each command sets its own, ``--cpu_devices``; one device when it does not)."""
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f)
    return env


def slow_prepare_script(pause_s: float) -> str:
    """``python -c`` source of a ``moe-data`` that pauses ``pause_s`` after each finished shard, so a
    test can act (kill it, start a second one) while it is part-way through a folder."""
    return f"""
import sys, time
from train.data import prepare as p
finish = p._ShardWriter._finish
def slow(self, position):
    finish(self, position)
    time.sleep({pause_s})
p._ShardWriter._finish = slow
from train.cli import data_main
sys.exit(data_main(sys.argv[1:]))
"""


def tiny_train_args(tmp, workdir, steps):
    """moe-train arguments for a tiny run on a small corpus written under ``tmp``."""
    import pathlib

    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"f{i}.py").write_text(("def add%d(a, b):\n    return a + b\n\nclass P:\n    x = 0\n" % i) * 60)
    root = pathlib.Path(__file__).resolve().parents[1]
    return [f"--config={root / 'configs/default.py'}", f"--workdir={workdir}",
            "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.d_ff=64",
            f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.train.seq_len=16",
            f"--config.data.path={corpus}", "--config.data.validation_fraction=0.25",
            "--config.log_every_steps=1", "--config.eval_every_steps=0", "--config.eval_batches=1",
            "--config.checkpoint.every_steps=2"]
