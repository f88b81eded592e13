"""scripts/gpu_bench.sh finishes whatever its steps do, and scripts/bench_summary.py turns what they
left behind into one JSON summary. The runner is driven by stand-in step commands (<STEP>_CMD):
no JAX, a few seconds in all."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"

_spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "scripts" / "bench_summary.py")
bench_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_summary)

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")

ORACLE_OUT = """jax 0.0 on [CudaDevice(id=0)]
ok    1dev topk k=1 capacity cf=0.5: dropped 0.125
FAIL  1dev topk k=1 dropless cf=0.5 tokamax: AssertionError: differs (oracle.py:12)
ok    grouped matmul tokamax E=8 8192 x 2048 x 1408 bf16: relative errors (y, dx, dw) [0.01, 0.01, 0.01]; kernel
FAIL  grouped matmul tokamax E=64 8192 x 2048 x 1408 bf16
Traceback (most recent call last):
AssertionError: relative errors
2/4 cases equal the oracle on gpu
oracle: 2/4 passed
"""


def _write_run(out: pathlib.Path, t0: float = 1000.0) -> None:
    """A run's leftovers: install skipped, probe ok, oracle failed, layer timed out, train ok with figures."""
    rows = [
        ("install", "skipped", "", "", "", "", "WHEELS not set"),
        ("probe", "running", "", t0, "", 45, ""),
        ("probe", "ok", 0, t0, t0 + 3.25, 45, ""),
        ("oracle", "running", "", t0 + 4, "", 120, ""),
        ("oracle", "failed", 1, t0 + 4, t0 + 64, 120, ""),
        ("layer", "running", "", t0 + 65, "", 150, ""),
        ("layer", "timeout", 124, t0 + 65, t0 + 215, 150, ""),
        ("train", "running", "", t0 + 216, "", 165, ""),
        ("train", "ok", 0, t0 + 216, t0 + 300, 165, ""),
    ]
    (out / "steps.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    (out / "probe.log").write_text('0.0 [CudaDevice(id=0)]\nprobe: 1 gpu tokamax {"jax": "0.0", "tokamax": "0.0.17"}\n')
    (out / "oracle.log").write_text(ORACLE_OUT)
    (out / "layer.log").write_text("".join(f"layer line {i}\n" for i in range(30)))
    (out / "train.log").write_text("| moe | ...\n")
    (out / "train.json").write_text(json.dumps({"moe": {"tokens_per_s": 1234.5, "mfu": 0.41}, "dense": {}}))


def test_summary_gathers_every_step_and_figure(tmp_path):
    _write_run(tmp_path)
    assert bench_summary.main([str(tmp_path), "--steps", "install,probe,oracle,layer,train", "--final",
                               "--meta", "mode=1", "--quiet"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is False and s["complete"] is True and s["interrupted"] is None and s["meta"] == {"mode": "1"}
    steps = s["steps"]
    assert list(steps) == ["install", "probe", "oracle", "layer", "train"]
    assert steps["install"] == {"status": "skipped", "rc": None, "seconds": None, "limit_s": None,
                                "note": "WHEELS not set", "log": None}
    assert steps["probe"]["status"] == "ok" and steps["probe"]["seconds"] == 3.2 and "tail" not in steps["probe"]
    assert steps["oracle"]["status"] == "failed" and steps["oracle"]["rc"] == 1 and steps["oracle"]["seconds"] == 60
    assert steps["oracle"]["tail"][-1] == "oracle: 2/4 passed"
    layer = steps["layer"]
    assert layer["status"] == "timeout" and layer["rc"] == 124 and layer["seconds"] == 150 and layer["limit_s"] == 150
    assert layer["log"] == str(tmp_path / "layer.log") and layer["tail"] == [f"layer line {i}" for i in range(10, 30)]
    assert steps["train"] == {"status": "ok", "rc": 0, "seconds": 84, "limit_s": 165,
                              "log": str(tmp_path / "train.log")}
    assert s["failures"] == ["oracle: exit code 1", "layer: timed out after 150 s",
                             "oracle: 2 of 4 cases differ (1dev topk k=1 dropless cf=0.5 tokamax, "
                             "grouped matmul tokamax E=64 8192 x 2048 x 1408 bf16)"]
    figures = s["figures"]
    assert figures["probe"] == {"devices": 1, "platform": "gpu", "grouped_matmul": "tokamax", "jax": "0.0",
                                "tokamax": "0.0.17"}
    assert figures["oracle"] == {
        "passed": 2, "total": 4, "complete": True,
        "failed_cases": ["1dev topk k=1 dropless cf=0.5 tokamax",
                         "grouped matmul tokamax E=64 8192 x 2048 x 1408 bf16"],
        "errors": {"1dev topk k=1 dropless cf=0.5 tokamax": "AssertionError: differs (oracle.py:12)"},
        "grouped_matmul": {"grouped matmul tokamax E=8 8192 x 2048 x 1408 bf16":
                           "relative errors (y, dx, dw) [0.01, 0.01, 0.01]; kernel"},
    }
    assert figures["train"]["moe"] == {"tokens_per_s": 1234.5, "mfu": 0.41}
    assert "layer" not in figures  # the timed-out step wrote none


def test_summary_of_a_run_in_progress_and_of_a_cut_oracle(tmp_path):
    (tmp_path / "steps.tsv").write_text("install\tskipped\t\t\t\t\tWHEELS not set\nlayer\tfailed\t1\t1\t2\t45\t\n"
                                        "oracle\trunning\t\t3\t\t120\t\n")
    (tmp_path / "oracle.log").write_text("ok    a: dropped 0.000\nFAIL  b\nTraceback\nok    c: dropped 0.1\n")
    (tmp_path / "layer.json").write_text('{"rows": [')  # cut short
    for name in ("install", "train"):  # an older run's: these steps did not run this time
        (tmp_path / f"{name}.log").write_text("old\n")
    (tmp_path / "train.json").write_text("{}")
    steps = ["install", "layer", "oracle", "train"]
    s = bench_summary.summarize(tmp_path, steps)
    assert s["ok"] is False and s["complete"] is False
    assert [s["steps"][n]["status"] for n in steps] == ["skipped", "failed", "running", "pending"]
    assert s["steps"]["install"]["log"] is None and s["steps"]["train"]["log"] is None
    assert s["figures"]["oracle"] == {"passed": 2, "total": 3, "complete": False, "failed_cases": ["b"]}
    assert "error" in s["figures"]["layer"] and "train" not in s["figures"]
    final = bench_summary.summarize(tmp_path, steps, final=True, interrupted="SIGINT")
    assert final["interrupted"] == "SIGINT"
    assert final["steps"]["oracle"]["status"] == "failed" and final["steps"]["oracle"]["note"] == "interrupted"
    assert final["steps"]["train"] == {"status": "skipped", "rc": None, "seconds": None, "limit_s": None,
                                       "note": "not reached", "log": None}


def _env(**steps) -> dict:
    """The environment for a runner whose steps are stand-in bash commands."""
    names = ("INSTALL", "PROBE", "ORACLE", "LAYER", "TRAIN")
    drop = {"QUICK", "STEPS", "WHEELS", "GPU_BENCH_ALLOW_CPU", "PYTHON",
            *(f"{n}_{kind}" for n in names for kind in ("S", "CMD"))}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {"PYTHON": sys.executable} | steps


def _summary(out: pathlib.Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@needs_shell
def test_runner_records_a_failed_and_a_timed_out_step_and_goes_on(tmp_path):
    env = _env(
        GPU_BENCH_ALLOW_CPU="1",
        PROBE_CMD="echo 'probe: 8 cpu ragged_dot {}'",
        ORACLE_CMD="echo 'ok    a: dropped 0.000'; echo 'FAIL  b'; echo '1/2 cases equal the oracle on cpu'; exit 3",
        LAYER_CMD="echo started; exec sleep 120", LAYER_S="1",
        TRAIN_CMD='echo \'{"moe": {"tokens_per_s": 7.5}}\' > "$GPU_BENCH_OUT/train.json"; echo trained',
    )
    (tmp_path / "layer.json").write_text("{}")  # an earlier run's: removed before the layer step
    start = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=100)
    assert time.monotonic() - start < 60  # the sleeping step was stopped at its limit, not waited for
    assert run.returncode == 1, run.stdout + run.stderr
    s = _summary(tmp_path)
    steps = s["steps"]
    assert {n: steps[n]["status"] for n in steps} == {"install": "skipped", "probe": "ok", "oracle": "failed",
                                                      "layer": "timeout", "train": "ok"}
    assert steps["oracle"]["rc"] == 3 and steps["layer"]["rc"] == 124 and steps["layer"]["limit_s"] == 1
    assert steps["layer"]["tail"] == ["started"] and steps["train"]["seconds"] < 30
    assert (tmp_path / "train.log").read_text() == "trained\n" and "trained" in run.stdout  # logged and shown
    assert s["complete"] and not s["ok"] and s["meta"]["mode"] == "smoke" and s["meta"]["expert_axis"] == "8"
    assert s["figures"]["oracle"]["passed"] == 1 and s["figures"]["oracle"]["total"] == 2
    assert s["figures"]["train"] == {"moe": {"tokens_per_s": 7.5}} and "layer" not in s["figures"]
    assert s["failures"][:2] == ["oracle: exit code 3", "layer: timed out after 1 s"]

    ok = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=100,
                        env=env | {"ORACLE_CMD": "echo '1/1 cases equal the oracle on cpu'", "STEPS": "oracle"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    s = _summary(tmp_path)
    assert s["ok"] and [v["status"] for v in s["steps"].values()] == ["skipped", "ok", "ok", "skipped", "skipped"]


@needs_shell
def test_runner_without_a_gpu_records_why_and_skips_the_rest(tmp_path):
    env = _env(PROBE_CMD="echo 'probe: 1 cpu ragged_dot {}'", ORACLE_CMD=f"touch '{tmp_path}/ran'")
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=100)
    assert run.returncode == 1 and "JAX sees no GPU" in run.stderr
    steps = _summary(tmp_path)["steps"]
    assert steps["probe"]["status"] == "failed" and "no GPU" in steps["probe"]["note"]
    assert all(steps[n]["status"] == "skipped" and "no GPU" in steps[n]["note"] for n in ("oracle", "layer", "train"))
    assert not (tmp_path / "ran").exists()


@needs_shell
def test_runner_interrupted_stops_the_step_and_writes_the_summary(tmp_path):
    pid_file = tmp_path / "step.pid"
    env = _env(PROBE_CMD="echo 'probe: 1 gpu ragged_dot {}'", ORACLE_CMD=f"echo $$ > '{pid_file}'; exec sleep 120")
    proc = subprocess.Popen(["bash", str(SCRIPT), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None, "the oracle step never started"
            time.sleep(0.1)
        step_pid = int(pid_file.read_text())
        running = _summary(tmp_path)  # rewritten as each step starts and ends
        assert running["steps"]["probe"]["status"] == "ok" and running["steps"]["oracle"]["status"] == "running"
        assert running["steps"]["layer"]["status"] == "pending" and not running["complete"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    s = _summary(tmp_path)
    assert s["interrupted"] == "SIGTERM" and s["complete"] and not s["ok"]
    oracle = s["steps"]["oracle"]
    assert oracle["status"] == "failed" and oracle["rc"] == 143 and oracle["note"] == "interrupted by SIGTERM"
    assert s["steps"]["layer"]["status"] == s["steps"]["train"]["status"] == "skipped"
    deadline = time.monotonic() + 30
    while _alive(step_pid):
        assert time.monotonic() < deadline, "the interrupted step's process still runs"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")  # a zombie left for its parent to reap counts as gone
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")
