"""train/analysis/stages.py reads CPU and GPU profiles: hand-built traces in the layout that
jax.profiler's perfetto_trace.json.gz has on each, and a small compiled-HLO text."""

import gzip
import json

import jax
import pytest

from train.analysis.stages import (
    PROFILE_COMPILER_OPTIONS,
    StageProfileError,
    op_stages,
    profile_compiler_options,
    read_trace,
    summarize,
)

pytestmark = pytest.mark.stack

HLO = """\
HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[8,4]{1,0})->f32[8]{0}}

%fused_multiply (param_0: f32[8,4], param_1: f32[8,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[8,4]{1,0} parameter(1)
  ROOT %multiply.1 = f32[8,4]{1,0} multiply(%param_0, %param_1), metadata={op_name="jit(f)/jvp()/route/mul"}
}

%fused_convert (param_0.2: s32[8]) -> f32[8] {
  %param_0.2 = s32[8]{0} parameter(0)
  ROOT %convert.3 = f32[8]{0} convert(%param_0.2), metadata={op_name="jit(f)/jvp()/permute/convert_element_type"}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%x, %y)
}

%fused_reduce (param_0.1: f32[8,4]) -> f32[8] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  %exponential.2 = f32[8,4]{1,0} exponential(%param_0.1), metadata={op_name="jit(f)/transpose(jvp())/experts/exp"}
  %bitcast.5 = f32[8,4]{1,0} bitcast(%exponential.2), metadata={op_name="jit(f)/transpose(jvp())/reshape"}
  ROOT %reduce.3 = f32[8]{0} reduce(%bitcast.5, %constant.1), dimensions={1}, to_apply=%add, metadata={op_name="jit(f)/transpose(jvp())/experts/reduce_sum"}
}

ENTRY %main.9 (x.1: f32[8,4], ids.1: s32[8]) -> f32[8] {
  %x.1 = f32[8,4]{1,0} parameter(0), metadata={op_name="x"}
  %ids.1 = s32[8]{0} parameter(1), metadata={op_name="ids"}
  %loop_multiply_fusion = f32[8,4]{1,0} fusion(%x.1, %x.1), kind=kLoop, calls=%fused_multiply, metadata={op_name="jit(f)/jvp()/route/mul"}
  %loop_convert_fusion.2 = f32[8]{0} fusion(%ids.1), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(f)/jvp()/permute/convert_element_type"}
  %custom-call.2 = (f32[8,4]{1,0}, s8[4194304]{0}) custom-call(%loop_multiply_fusion, %x.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/jvp()/shard_map/experts/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1}}
  %get-tuple-element.1 = f32[8,4]{1,0} get-tuple-element(%custom-call.2), index=0
  %all-to-all-start.1 = ((f32[8,4]{1,0}), f32[8,4]{1,0}) all-to-all-start(%get-tuple-element.1), replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(f)/jvp()/shard_map/exchange/all_to_all"}
  %all-to-all-done.1 = f32[8,4]{1,0} all-to-all-done(%all-to-all-start.1), metadata={op_name="jit(f)/jvp()/shard_map/exchange/all_to_all"}
  %copy.4 = f32[8,4]{1,0} copy(%all-to-all-done.1), metadata={op_name="jit(f)/jvp()/shard_map/unpermute/transpose"}
  %input_reduce_fusion = f32[8]{0} fusion(%copy.4), kind=kInput, calls=%fused_reduce
  %loop_add_fusion = f32[8]{0} fusion(%input_reduce_fusion, %loop_convert_fusion.2), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/add_any"}
  ROOT %call.4 = f32[8]{0} call(%loop_add_fusion), to_apply=%command_buffer
}
"""

STAGE_OF_OP = {
    "loop_multiply_fusion": "route", "loop_convert_fusion.2": "permute", "custom-call.2": "experts",
    "all-to-all-start.1": "exchange", "all-to-all-done.1": "exchange", "copy.4": "unpermute",
    "input_reduce_fusion": "experts bwd", "loop_add_fusion": "other",
}


def test_op_stages_maps_instructions_and_fusions_without_metadata():
    stages = op_stages(HLO)
    assert {op: stages[op] for op in STAGE_OF_OP} == STAGE_OF_OP
    # the fused computations' own instructions, from their metadata
    assert stages["multiply.1"] == "route" and stages["reduce.3"] == "experts bwd" and stages["bitcast.5"] == "other"
    assert "call.4" not in stages  # a call (a command buffer) may span stages: it takes none
    assert "add.0" not in stages and "x.1" in stages  # no metadata: no stage; parameters with op_name="x": other


def meta(pid, process, threads):
    """The metadata events naming a process and its threads, as the trace writes them."""
    out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}},
           {"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": pid}}]
    for tid, name in threads.items():
        out.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
    return out


def kernel(pid, tid, ts, dur, name, hlo_op=None, correlation_id=0):
    """A CUPTI activity event on a GPU stream: XLA's annotation gives hlo_op, hlo_module, name."""
    args = {"context_id": "$$1", "correlation_id": str(correlation_id), "theoretical_occupancy_pct": "100",
            "occupancy_min_grid_size": "132", "occupancy_suggested_block_size": "768"}
    if hlo_op is not None:
        args |= {"hlo_module": "jit_f", "hlo_op": hlo_op, "name": "jvp()/op", "tf_op": "XlaModule",
                 "unique_hlo_op_id": "41"}
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


# (kernel name, hlo_op, stream thread, duration on GPU 0 in us); GPU 1 takes twice as long
GPU_OPS = [
    ("loop_multiply_fusion", "loop_multiply_fusion", 13, 10.0),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "custom-call.2", 13, 40.0),  # cuBLAS
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all-to-all-start.1", 17, 25.0),
    ("MemcpyD2D", "copy.4", 13, 5.0),
    ("input_reduce_fusion", "input_reduce_fusion", 13, 20.0),  # no metadata of its own
    ("input_reduce_fusion", "input_reduce_fusion", 13, 2.5),  # a second kernel of the same fusion
    ("loop_convert_fusion_2", None, 13, 4.0),  # no annotation: matched by its kernel name
    ("loop_add_fusion", "loop_add_fusion", 13, 1.0),
    ("redzone_checker", None, 13, 7.0),  # no HLO instruction
    ("loop_add_fusion", "command_buffer", 13, 9.0),  # an hlo_op that is no instruction: not by its name either
]


def gpu_trace(calls=2, ops=GPU_OPS):
    """Two GPUs and the host, in the layout of jax.profiler's trace on CUDA."""
    events = meta(701, "/host:CPU", {1234: "python", 5678: "tf_XLAGpuClient/0"})
    for device in (0, 1):
        pid = 1 + device
        events += meta(pid, f"/device:GPU:{device}", {13: "Stream #13(Kernel,MemcpyD2D)", 17: "Stream #17(Kernel)",
                                                       100: "XLA Ops", 4: "CUPTI overhead"})
    ts, correlation = 0.0, 100
    for _ in range(calls):
        events.append({"ph": "X", "pid": 701, "tid": 1234, "ts": ts, "dur": 900.5, "name": "PjitFunction(f)"})
        for device in (0, 1):
            for name, hlo_op, stream, dur in ops:
                correlation += 1
                launch = kernel(701, 5678, ts, 3.0, "cuLaunchKernel", hlo_op, correlation)
                launch["args"]["device_id"] = str(device)  # host-side launch: never device time
                events.append(launch)
                events.append(kernel(1 + device, stream, ts + 5, dur * (1 + device), name, hlo_op, correlation))
                if hlo_op:  # a derived line, where a viewer made one: the same op again
                    events.append({"ph": "X", "pid": 1 + device, "tid": 100, "ts": ts + 5, "dur": dur,
                                   "name": hlo_op, "args": {"hlo_op": hlo_op, "hlo_module": "jit_f"}})
                ts += 50.0
    return events + [{}]


def test_gpu_trace_sums_stream_kernels_by_stage_per_call_and_device():
    got = summarize(gpu_trace(calls=2), op_stages(HLO), calls=2)
    # per call and device: GPU 0's time and twice it on GPU 1, over 2 devices -> 1.5x GPU 0's, in ms
    want = {"route": 10.0, "experts": 40.0, "exchange": 25.0, "unpermute": 5.0, "experts bwd": 22.5,
            "permute": 4.0, "other": 1.0}
    assert got == pytest.approx({stage: 1.5 * us / 1e3 for stage, us in want.items()})


def test_trace_file_round_trip(tmp_path):
    path = tmp_path / "perfetto_trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"displayTimeUnit": "ns", "traceEvents": gpu_trace(calls=1)}).encode()))
    assert summarize(read_trace(path), op_stages(HLO), calls=1)["experts"] == pytest.approx(0.06)


def test_cpu_trace_counts_every_thunk_event_with_a_known_hlo_op():
    events = meta(701, "/host:CPU", {11: "python", 21: "tf_XLAPjRtCpuClient/1", 22: "tf_XLAPjRtCpuClient/2"})
    events.append({"ph": "X", "pid": 701, "tid": 11, "ts": 1.0, "dur": 500.0, "name": "$contextlib.py:132 __enter__"})
    events.append({"ph": "X", "pid": 701, "tid": 21, "ts": 2.0, "dur": 1e-06, "name": "ThreadpoolListener::StartRegion",
                   "args": {"_src": "external/xla/xla/tsl/profiler/backends/cpu/threadpool_listener.cc"}})
    for device, tid in ((0, 21), (1, 22)):
        for op, dur in (("loop_multiply_fusion", 30.0), ("custom-call.2", 120.0), ("input_reduce_fusion", 8.0),
                        ("add.0", 99.0), ("not_in_the_program", 99.0)):
            events.append({"ph": "X", "pid": 701, "tid": tid, "ts": 10.0, "dur": dur * (1 + device), "name": op,
                           "args": {"_src": "external/xla/xla/backends/cpu/runtime/thunk_executor.cc",
                                    "device_ordinal": str(device), "hlo_module": "jit_f", "hlo_op": op,
                                    "run_id": "1527778007"}})
    got = summarize(events, op_stages(HLO), calls=1)
    assert got == pytest.approx({"route": 0.045, "experts": 0.18, "experts bwd": 0.012})


def test_a_profile_that_matched_nothing_is_an_error_naming_what_it_saw():
    # kernels that a command buffer launched: XLA's annotation names the command buffer, no instruction
    unmatched = [(name, "command_buffer", stream, dur) for name, _, stream, dur in GPU_OPS]
    with pytest.raises(StageProfileError) as err:
        summarize(gpu_trace(calls=1, ops=unmatched), op_stages(HLO), calls=1, source="perfetto_trace.json.gz")
    msg = str(err.value)
    assert "\n" not in msg and "perfetto_trace.json.gz" in msg and "xla_gpu_enable_command_buffer" in msg
    assert "/device:GPU:0 [CUPTI overhead, Stream #13(Kernel,MemcpyD2D), Stream #17(Kernel), XLA Ops]" in msg
    assert "/host:CPU [python, tf_XLAGpuClient/0]" in msg
    assert f"{1 + 2 * len(unmatched) * 3} complete events of" in msg  # 1 host step, per device: launch, kernel, XLA Op
    with pytest.raises(StageProfileError, match="0 complete events of 0; processes: none named"):
        summarize([], op_stages(HLO), calls=1)


def test_profile_compiler_options_turn_command_buffers_off_on_gpu_only():
    assert profile_compiler_options("gpu") == {"xla_gpu_enable_command_buffer": ""}
    assert profile_compiler_options("cpu") == {}
    # a valid XLA option (XLA rejects unknown ones and bad values at compile time)
    compiled = jax.jit(lambda x: x * 2).lower(1.0).compile(PROFILE_COMPILER_OPTIONS["gpu"])
    assert float(compiled(3.0)) == 6.0


def test_bench_layer_prints_one_line_and_a_row_of_na_when_a_profile_matched_nothing(monkeypatch):
    from train.analysis import bench_layer

    def matched_nothing(compiled, args, calls):
        raise StageProfileError("no device time in perfetto_trace.json.gz matched (2 complete events of 9)")

    monkeypatch.setattr(bench_layer, "stage_times", matched_nothing)
    cfg = bench_layer.BenchConfig(experts=(8,), tokens_per_device=(32,), d_model=16, d_ff=32, seq_len=16,
                                  repeats=1, iters=1, stages=True)
    lines = []
    rows = bench_layer.run(cfg, log=lines.append)
    assert "  moe by stage: unavailable: no device time in perfetto_trace.json.gz matched (2 complete events of 9)" in lines
    assert "moe_stages_ms" not in rows[0] and rows[0]["moe_stages_error"].startswith("no device time")
    assert "| 32 | 1 | 8 | moe | " + " | ".join(["n/a"] * 7) + " |" in bench_layer.stages_table(rows)
