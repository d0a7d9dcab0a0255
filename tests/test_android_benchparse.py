"""The benchmark_model log parser, on logs in the stock tool's format.

No phone or stock binary is available here, so these fixtures are written by hand from the
documented output format (the log lines that tensorflow/lite/tools/benchmark's
benchmark_tflite_model.cc prints: "Timings (microseconds)", "Inference timings in us", "Memory footprint delta"),
with the numbers chosen so each field is distinguishable.
"""

import pytest

from fwdllm.android_harness.adb import parse_devices
from fwdllm.android_harness.benchparse import parse_benchmark_output

XNNPACK_LOG = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Num threads: [4]
INFO: Graph: [/data/local/tmp/fwdllm/bundle/full.tflite]
INFO: #threads used for CPU inference: [4]
INFO: Use xnnpack: [1]
INFO: Loaded model /data/local/tmp/fwdllm/bundle/full.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: XNNPACK delegate created.
INFO: Explicitly applied XNNPACK delegate, and the model graph will be partially executed by the delegate \
w/ 7 delegate kernels.
INFO: The input model file size (MB): 90.6021
INFO: Initialized session in 412.5ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=12 first=61234 curr=40111 min=39876 max=61234 avg=42001.5 std=5870

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=50 first=40555 curr=40321 min=39001 max=44120 avg=40412.3 std=812

INFO: Inference timings in us: Init: 412500, First inference: 61234, Warmup (avg): 42001.5, Inference (avg): 40412.3
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual \
memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=101.25 overall=118.5
INFO: Overall peak memory footprint (MB) via periodic monitoring: 131.75
"""

GPU_FULL_LOG = """\
INFO: Use gpu: [1]
INFO: Loaded model full.tflite
INFO: Created TensorFlow Lite delegate for GPU.
INFO: GPU delegate created.
INFO: Initialized OpenCL-based API.
INFO: Created 1 GPU delegate kernels.
INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the delegate.
INFO: Initialized session in 842.225ms.
INFO: count=13 first=115098 curr=36666 min=32079 max=115098 avg=40199.8 std=21694
INFO: count=1694 first=35688 curr=33419 min=30394 max=42335 avg=35134.9 std=1733
INFO: Inference timings in us: Init: 842225, First inference: 115098, Warmup (avg): 40199.8, Inference (avg): 35134.9
"""

GPU_FAILED_LOG = """\
INFO: Use gpu: [1]
INFO: Loaded model full.tflite
INFO: Created TensorFlow Lite delegate for GPU.
ERROR: Following operations are not supported by GPU delegate:
ERROR: BATCH_MATMUL: Not supported batched mat mul case
ERROR: Failed to apply GPU delegate.
ERROR: Benchmarking failed.
"""

NNAPI_UNUSED_LOG = """\
INFO: Use NNAPI: [1]
INFO: NNAPI accelerators available: [nnapi-reference]
INFO: Loaded model full.tflite
INFO: Though NNAPI delegate is explicitly applied, the model graph will not be executed by the delegate.
INFO: Initialized session in 20.1ms.
INFO: count=50 first=70000 curr=69000 min=68000 max=71000 avg=69500 std=400
INFO: Inference timings in us: Init: 20100, First inference: 70000, Warmup (avg): 69800, Inference (avg): 69500
"""

GPU_UNSUPPORTED_LOG = """\
Use gpu: [1]
Loaded model model.tflite
GPU acceleration is unsupported on this platform.
Initialized session in 18.738ms.
count=50 first=74456 curr=74516 min=73909 max=75323 avg=74481.6 std=268
Inference timings in us: Init: 18738, First inference: 140706, Warmup (avg): 85791.2, Inference (avg): 74481.6
"""

OLD_CPU_LOG = """\
Loaded model full.tflite
Initialized session in 3.1ms.
Timings (microseconds): count=50 first=9000 curr=8100 min=8000 max=9000 avg=8200 std=150
Inference timings in us: Init: 3100, First inference: 9000, Warmup (avg): 8500, Inference (avg): 8200
Memory footprint delta from the start of the tool (MB): init=5.5 overall=6.25
"""


def test_xnnpack_run_is_parsed_field_by_field():
    r = parse_benchmark_output(XNNPACK_LOG, "xnnpack")
    assert r.status == "ok"
    assert (r.init_us, r.first_us, r.warmup_avg_us, r.avg_us) == (412500, 61234, 42001.5, 40412.3)
    assert (r.runs, r.min_us, r.max_us, r.std_us) == (50, 39001, 44120, 812)  # the main run, not the warm-up
    assert (r.delegate_kernels, r.fully_delegated) == (7, False)
    assert (r.memory_init_mb, r.memory_overall_mb, r.peak_memory_mb) == (101.25, 118.5, 131.75)


def test_fully_delegated_gpu():
    r = parse_benchmark_output(GPU_FULL_LOG, "gpu")
    assert r.status == "ok" and r.fully_delegated is True and r.delegate_kernels == 1
    assert r.avg_us == 35134.9 and r.runs == 1694


def test_delegate_that_fails_to_apply_is_failed_with_its_reason():
    r = parse_benchmark_output(GPU_FAILED_LOG, "gpu", exit_code=1)
    assert r.status == "failed" and r.avg_us is None
    assert "Failed to apply GPU delegate." in r.message and "exit 1" in r.message
    assert any("BATCH_MATMUL" in e for e in r.errors)


@pytest.mark.parametrize(
    "log,delegate,why",
    [
        (NNAPI_UNUSED_LOG, "nnapi", "took no part"),
        (GPU_UNSUPPORTED_LOG, "gpu", "unsupported"),
        (OLD_CPU_LOG, "xnnpack", "no sign"),
    ],
)
def test_delegate_not_applied_keeps_the_cpu_timing_but_says_so(log, delegate, why):
    r = parse_benchmark_output(log, delegate)
    assert r.status == "not-applied" and why in r.message and r.avg_us is not None


def test_cpu_run_in_old_format():
    r = parse_benchmark_output(OLD_CPU_LOG, "cpu")
    assert r.status == "ok" and r.avg_us == 8200 and r.runs == 50 and r.memory_overall_mb == 6.25


def test_output_without_timings_is_a_failure_even_with_exit_zero():
    r = parse_benchmark_output("INFO: Loaded model x.tflite\n", "cpu", exit_code=0)
    assert r.status == "failed" and "Loaded model" in r.message


def test_parse_devices_lines():
    text = (
        "* daemon not running; starting now at tcp:5037\n* daemon started successfully\nList of devices attached\n"
        "R58M123ABC\tdevice usb:1-1 product:a52qnsxx model:SM_A525F device:a52q transport_id:3\n"
        "emulator-5554\toffline\n192.168.1.20:5555\tunauthorized transport_id:4\n\n"
    )
    devs = parse_devices(text)
    assert [(d.serial, d.state) for d in devs] == [
        ("R58M123ABC", "device"),
        ("emulator-5554", "offline"),
        ("192.168.1.20:5555", "unauthorized"),
    ]
    assert devs[0].info["model"] == "SM_A525F"
