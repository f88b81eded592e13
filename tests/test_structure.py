"""The structure the code promises: imports run one way with no cycle, files and functions stay
small, the model reads no environment, a router is known by its own module only, and so is a
Hugging Face family."""

import ast
import dataclasses
import importlib
import inspect
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "sharding", "train")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Project modules ``path`` imports at run time (at any level: lazy imports count too; those
    under ``if TYPE_CHECKING`` do not run)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycle_and_imports_run_one_way():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    for module, deps in graph.items():
        top = module.split(".")[0]
        allowed = {"train": PACKAGES, "moe": ("moe", "sharding"), "sharding": ("sharding",)}[top]
        assert all(d.split(".")[0] in allowed for d in deps), (module, deps)
        if module.startswith(("train.data", "train.services")):  # both sit below the training core
            assert not any(d.startswith(("train.core", "train.cli", "train.inference", "train.interop",
                                         "train.analysis")) for d in deps), (module, deps)
        if module.startswith("train.services"):  # a run's services know nothing of its data either
            assert not any(d.startswith("train.data") for d in deps), (module, deps)

    # a package imports its own submodules; cycles are looked for between modules below that
    def edges(m):
        return {d for d in graph[m] if not m.startswith(d + ".") and not (d == m.rpartition(".")[0])}

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in edges(m):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_files_and_functions_stay_small():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = path.read_text().count("\n")
            assert lines <= 400, f"{path.relative_to(ROOT)}: {lines} lines"
    checked = [*(ROOT / "moe").rglob("*.py"), ROOT / "train/core/loop.py", ROOT / "train/core/step.py"]
    for path in checked:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines"


def test_the_model_reads_no_environment_files_or_backend():
    for path in (ROOT / "moe").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("os.environ", "default_backend", "open(", "sys.argv"):
            assert forbidden not in text, f"{path.relative_to(ROOT)} uses {forbidden}"


def test_no_router_is_named_outside_its_own_module_and_the_training_code_names_none():
    from moe.routers import ROUTERS

    quoted = {f'"{name}"' for name in ROUTERS} | {f"'{name}'" for name in ROUTERS}
    users = [p for p in (ROOT / "moe").glob("*.py") if p.name != "layer_config.py"]  # MoEConfig: the default's name
    for path in [*(ROOT / "train").rglob("*.py"), *users, *(ROOT / "moe/dispatch").rglob("*.py")]:
        text = path.read_text()
        named = [q for q in quoted if q in text]
        assert not named, f"{path.relative_to(ROOT)} names routers {named}"


def test_routers_own_their_options_and_nothing_else_reads_them():
    """Each router family declares its settings (``Options``, in its module) and reads them itself;
    ``MoEConfig`` keeps only what every MoE layer has. Outside ``moe/routers/`` only the Hugging Face
    families (which map them from config.json) touch a router's options; training, the layer and the
    model ask the router (e.g. ``consistency_weight``). The old flat names live on only where the
    option declares them (``formerly``), for the one translation of saved configs."""
    from moe.config import MoEConfig
    from moe.routers import FORMERLY, ROUTERS

    for name, cls in ROUTERS.items():
        assert cls.Options is None or cls.Options.__module__.startswith("moe.routers."), name
    for f in dataclasses.fields(MoEConfig):
        assert not any(f.name == r or f.name.startswith(f"{r}_") for r in ROUTERS), f"MoEConfig.{f.name} is a router's"
    assert set(FORMERLY) == {"hash_seed", "gshard_threshold", "loss_free_gamma", "stable_freeze_step", "stable_balance",
                             "stable_gate", "thor_consistency", "num_groups", "topk_groups", "routed_scaling"}
    reads = {"router_options", "options_of", "Options", *FORMERLY}
    own = (ROOT / "moe" / "routers", ROOT / "train" / "interop" / "families")
    for path in [*(ROOT / "train").rglob("*.py"), *(ROOT / "moe").rglob("*.py")]:
        if any(d in path.parents for d in own) or path.name == "layer_config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in reads:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} reads the router option {node.attr}")


def test_the_command_lines_import_no_jax_and_take_their_choices_from_the_typed_config():
    """Parsing a command line (and ``--help``) starts no JAX; a choice list (activations, dtypes,
    scan modes...) is the config's own tuple, never a copy of its strings."""
    import subprocess
    import sys

    clis = sorted(p.stem for p in (ROOT / "train" / "cli").glob("*.py") if p.stem != "__init__")
    code = (f"import sys\nfor m in {clis!r}: __import__('train.cli.' + m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    for path in (ROOT / "train" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "choices":
                assert not isinstance(node.value, (ast.Tuple, ast.List, ast.Set)), \
                    f"{path.relative_to(ROOT)}:{node.value.lineno}: a literal choice list"


def test_what_a_resumed_run_may_change_is_declared_on_the_fields():
    from train.core.config import RESUMABLE, Config
    from moe.fields import flagged_keys

    assert RESUMABLE == flagged_keys(Config(), "resumable")
    assert {"train.steps", "checkpoint.", "mesh.", "optimizer.", "model.remat", "model.moe.grouped_matmul"} <= set(RESUMABLE)
    keys = set(RESUMABLE)
    for fixed in ("model.d_model", "model.moe.router", "train.batch_size", "train.seq_len", "data.path", "train.seed"):
        assert not any(fixed.startswith(k) for k in keys), fixed
    assert flagged_keys(Config(), "run_time") == ("model.moe.ragged_exchange", "model.moe.grouped_matmul")


FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
REGISTRY = {"ARCHITECTURES", "FAMILIES"}  # an architecture may be looked up in these, nothing else


def _architecture_comparisons(tree: ast.AST, names) -> list[int]:
    """Lines of ``tree`` that dispatch on an architecture's name: a comparison (==, !=, in, a match
    case) with a family's name, a dict keyed by one, or a comparison of an ``arch`` / ``model_type``
    (a name, an attribute, ``hf.get("model_type")``) with anything but the registry."""

    def strings(node):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [s for e in node.elts for s in strings(e)]
        return [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []

    def is_arch(node):
        return any(isinstance(n, ast.Name) and n.id in ("arch", "model_type")
                   or isinstance(n, ast.Attribute) and n.attr in ("arch", "model_type")
                   or isinstance(n, ast.Constant) and n.value == "model_type" for n in ast.walk(node))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = any(s in names for o in operands for s in strings(o))
            registry = all(isinstance(o, ast.Name) and o.id in REGISTRY for o in operands if not is_arch(o))
            if named or (any(map(is_arch, operands)) and not registry):
                found.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and any(s in names for s in strings(node.value)):
            found.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(k is not None and s in names for k in node.keys for s in strings(k)):
            found.append(node.lineno)
    return found


def test_no_architecture_is_compared_outside_its_own_family_module():
    from train.interop.families import FAMILIES

    for bad in ('arch == "mixtral"', 'x in ("qwen2_moe", "olmoe")', 'hf.get("model_type") != other',
                'a = {"deepseek_v3": 1}', 'match f:\n    case "olmoe": pass', 'self.arch == y'):
        assert _architecture_comparisons(ast.parse(bad), FAMILIES), bad
    for fine in ("arch not in ARCHITECTURES", 'cfg.attention == "mla"', 'f(arch, "mixtral")'):
        assert not _architecture_comparisons(ast.parse(fine), FAMILIES), fine
    own = {pathlib.Path(importlib.import_module(type(f).__module__).__file__).resolve() for f in FAMILIES.values()}
    for folder in (*PACKAGES, "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() in own:
                continue
            lines = _architecture_comparisons(ast.parse(path.read_text()), FAMILIES)
            assert not lines, f"{path.relative_to(ROOT)}:{lines}: compares an architecture's name (ask its family)"


def test_each_family_is_registered_from_its_own_module():
    from train.interop.families import ARCHITECTURES, FAMILIES

    assert ARCHITECTURES == FAMILY_NAMES
    assert sorted(FAMILIES) == sorted(FAMILY_NAMES)
    for name, family in FAMILIES.items():
        assert family.name == name
        assert type(family).__module__ == f"train.interop.families.{name}", (name, type(family).__module__)


def test_one_checkpoint_writer_and_one_way_to_build_the_model():
    """Only the checkpoint module speaks Orbax (training and import both write through it; the
    coordination service's barrier aside), and outside ``moe/`` the model is built by
    ``build_model`` / ``abstract_model`` only, never by calling ``Transformer(...)``."""
    orbax_users = {"train/core/checkpoint.py", "sharding/distributed.py"}
    for folder in ("train", "sharding", "scripts", "moe"):
        for path in (ROOT / folder).rglob("*.py"):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert where in orbax_users or not any(n.split(".")[0] == "orbax" for n in names), where
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Transformer":
                    assert where == "moe/transformer.py", f"{where}:{node.lineno} builds Transformer(...) itself"


def test_the_run_is_a_frozen_value_and_the_loop_is_functions_over_it():
    """``setup`` returns a frozen ``Run`` (its parts never rebound) and the state beside it; the
    loop's classes are its own small parts, none of them a run, and nothing in ``train/`` assigns
    to a run's attributes."""
    from train.core import loop, setup
    from train.core.run import Probe, Programs, Run

    for cls in (Run, Programs, Probe):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
    assert list(inspect.signature(setup.setup).parameters)[:2] == ["cfg", "workdir"]
    assert list(inspect.signature(loop.train).parameters)[:2] == ["run", "state"]
    classes = {n for n, c in vars(loop).items() if isinstance(c, type) and c.__module__ == loop.__name__}
    assert classes == {"Throughput", "StepLog", "Progress"}, classes
    for path in (ROOT / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    base = getattr(target, "value", None)
                    assert not (isinstance(target, ast.Attribute) and getattr(base, "id", None) == "run"), \
                        f"{path.relative_to(ROOT)}:{node.lineno} rebinds a part of the run"


def test_every_test_marked_stack_is_in_a_file_the_second_lane_runs():
    """`make test-312` runs the tests marked ``stack`` in ``STACK_TESTS`` only: a mark in another file
    would be silently left out of that lane."""
    import re

    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^STACK_TESTS \?=((?:.*\\\n)*.*)$", makefile, re.M).group(1).replace("\\\n", " ").split()
    marked = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")
                    if p.name != "test_structure.py" and re.search(r"@stack\b|pytest\.mark\.stack\b|on_both_stacks\(", p.read_text()))
    assert marked and set(marked) <= set(listed), sorted(set(marked) - set(listed))
    assert set(listed) <= set(marked), sorted(set(listed) - set(marked))  # no file there for nothing
