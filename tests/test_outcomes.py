"""Classifying finished attempts: OOM texts of each framework, lookalikes, exit codes, tails."""

import os
import tracemalloc

import pytest

from ledger.outcomes import OomInfo, Verdict, detect_oom, judge, last_lines, read_tail

try:
    from tests.fixtures_sim import machine, make_sim  # noqa: F401
except ImportError:
    from fixtures_sim import machine, make_sim  # noqa: F401

TORCH2_OOM = """\
Epoch 3:  41%|████      | 410/1000 [02:13<03:11,  3.08it/s, loss=1.92]
Traceback (most recent call last):
  File "/home/ana/proj/train.py", line 301, in <module>
    main(args)
  File "/home/ana/proj/train.py", line 264, in main
    outputs = model(**batch)
  File "/home/ana/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1736, in _wrapped_call_impl
    return self._call_impl(*args, **kwargs)
  File "/home/ana/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1747, in _call_impl
    return forward_call(*args, **kwargs)
  File "/home/ana/.venv/lib/python3.11/site-packages/transformers/models/llama/modeling_llama.py", line 1189, in forward
    logits = logits.float()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB \
of which 1.23 GiB is free. Including non-PyTorch memory, this process has 77.90 GiB memory in use. Of the allocated \
memory 75.12 GiB is allocated by PyTorch, and 1.98 GiB is reserved by PyTorch but unallocated. If reserved but \
unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  \
See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)
"""

TORCH_CUDA_OOM_113 = """\
Traceback (most recent call last):
  File "train.py", line 88, in <module>
    loss.backward()
  File "/opt/conda/lib/python3.9/site-packages/torch/_tensor.py", line 487, in backward
    torch.autograd.backward(
  File "/opt/conda/lib/python3.9/site-packages/torch/autograd/__init__.py", line 197, in backward
    Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass
torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 23.69 GiB total capacity; \
21.95 GiB already allocated; 313.06 MiB free; 22.57 GiB reserved in total by PyTorch) If reserved memory is >> \
allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and \
PYTORCH_CUDA_ALLOC_CONF
"""

RUNTIME_CUDA_OOM = """\
Traceback (most recent call last):
  File "main.py", line 40, in <module>
    x = torch.randn(1024, 1024, 1024, device="cuda")
RuntimeError: CUDA out of memory. Tried to allocate 4.00 GiB (GPU 1; 10.76 GiB total capacity; 8.12 GiB already \
allocated; 1.50 GiB free; 8.20 GiB reserved in total by PyTorch)
"""

CUDA_ERROR_OOM = """\
Traceback (most recent call last):
  File "bench.py", line 12, in <module>
    torch.cuda.synchronize()
  File "/usr/lib/python3/dist-packages/torch/cuda/__init__.py", line 783, in synchronize
    return torch._C._cuda_synchronize()
RuntimeError: CUDA error: out of memory
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1.
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""

CUBLAS_OOM = """\
Traceback (most recent call last):
  File "finetune.py", line 150, in <module>
    out = layer(x)
  File "/opt/conda/lib/python3.10/site-packages/torch/nn/modules/linear.py", line 114, in forward
    return F.linear(input, self.weight, self.bias)
RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`
"""

JAX_OOM = """\
2024-05-02 10:11:12.345678: W external/tsl/tsl/framework/bfc_allocator.cc:485] Allocator (GPU_0_bfc) ran out of \
memory trying to allocate 16.00GiB (rounded to 17179869184)requested by op
Traceback (most recent call last):
  File "/home/u/jax_train.py", line 77, in <module>
    state, metrics = train_step(state, batch)
jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception. Set \
JAX_TRACEBACK_FILTERING=off to include these.
"""

JAX_FAILED_TO_ALLOCATE = (
    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Failed to allocate request for 300.00GiB "
    "(322122547200B) on device ordinal 0\n"
)

TF_OOM = """\
2024-03-01 09:00:00.000000: W tensorflow/core/common_runtime/bfc_allocator.cc:479] Allocator (GPU_0_bfc) ran out \
of memory trying to allocate 4.00GiB (rounded to 4294967296)
Traceback (most recent call last):
  File "keras_train.py", line 55, in <module>
    model.fit(ds, epochs=10)
tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor with \
shape[32,1024,1024,32] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc
\t [[{{node model/conv2d/Conv2D}}]]
Hint: If you want to see a list of allocated tensors when OOM happens, add report_tensor_allocations_upon_oom to \
RunOptions for current allocation info.
"""

CONFIG_DUMP = """\
config:
  memory_limit: 80GB
  use_memory_efficient_attention: true
  out_of_memory_retry: 3
  notes: "retry on CUDA OOM disabled"
Traceback (most recent call last):
  File "train.py", line 10, in <module>
    raise ValueError("dataset path does not exist: /data/missing")
ValueError: dataset path does not exist: /data/missing
"""


# --- detect_oom ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, requested, capacity", [
    (TORCH2_OOM, "torch", 2048.0, 79.15 * 1024),
    (TORCH_CUDA_OOM_113, "torch", 512.0, 23.69 * 1024),
    (RUNTIME_CUDA_OOM, "torch", 4096.0, 10.76 * 1024),
    (CUDA_ERROR_OOM, "cuda", None, None),
    (CUBLAS_OOM, "cublas", None, None),
    (JAX_OOM, "xla", 16384.0, None),
    (JAX_FAILED_TO_ALLOCATE, "xla", 300 * 1024.0, None),
    (TF_OOM, "tensorflow", 4096.0, None),
])
def test_detect_oom_recognises_each_framework(text, kind, requested, capacity):
    oom = detect_oom(text)
    assert oom is not None and oom.kind == kind
    assert oom.requested_mib == pytest.approx(requested) if requested else oom.requested_mib is None
    assert oom.capacity_mib == pytest.approx(capacity) if capacity else oom.capacity_mib is None
    assert "\n" not in oom.line


@pytest.mark.parametrize("text", [
    CONFIG_DUMP,
    "Killed\n",
    "memory_limit: 80GB\nuse_memory_efficient_attention: true\nout_of_memory_retry: 3\n",
    "INFO peak GPU memory 71.2 GiB; no out of memory events\n",
    "",
])
def test_lookalikes_are_not_ooms(text):
    assert detect_oom(text) is None


def test_detect_oom_uses_the_last_matching_line():
    text = RUNTIME_CUDA_OOM + "retrying with a smaller batch\n" + TORCH2_OOM
    oom = detect_oom(text)
    assert oom.requested_mib == pytest.approx(2048.0)
    assert oom.line.startswith("torch.OutOfMemoryError")


# --- judge -----------------------------------------------------------------------------------


def test_exit_zero_is_success_even_with_oom_text():
    verdict = judge(0, None, TORCH2_OOM + "recovered with batch size 8\n", True, 81920)
    assert verdict == Verdict("success", "exit 0", None, False)
    assert judge(0, None, "", None, None).outcome == "success"


def test_exit_zero_without_output_is_missing_output():
    verdict = judge(0, None, "done\n", False, None, output_pattern="results/{id}.json")
    assert verdict.outcome == "missing_output"
    assert verdict.reason == "exit 0 but output check matched nothing: results/{id}.json"


def test_non_zero_exit_with_oom_is_oom():
    verdict = judge(1, None, TORCH2_OOM, None, 81920)
    assert verdict.outcome == "oom" and not verdict.impossible
    assert verdict.oom.kind == "torch"
    assert verdict.reason.startswith("out of GPU memory (torch): torch.OutOfMemoryError: CUDA out of memory.")
    assert len(verdict.reason) <= 240


def test_impossible_allocation_is_flagged():
    tail = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 200.00 GiB. GPU 0 has a total capacity "
            "of 79.15 GiB of which 78.00 GiB is free.\n")
    verdict = judge(1, None, tail, None, 81920)
    assert verdict.outcome == "oom" and verdict.impossible
    assert verdict.reason == "requested 200.00 GiB but the GPU has 80.00 GiB: can never fit"
    assert judge(1, None, tail, None, None).reason == "requested 200.00 GiB but the GPU has 79.15 GiB: can never fit"
    assert judge(1, None, JAX_FAILED_TO_ALLOCATE, None, 81920).impossible


def test_oom_that_would_fit_an_empty_gpu_is_not_impossible():
    assert not judge(1, None, JAX_OOM, None, 81920).impossible
    assert not judge(1, None, CUDA_ERROR_OOM, None, 81920).impossible


def test_host_kill_is_not_an_oom():
    verdict = judge(137, None, "epoch 1 step 5\nKilled\n", None, 81920)
    assert verdict == Verdict("exit_code", "killed (exit 137; host out of memory?)", None, False)
    verdict = judge(None, 9, "epoch 1 step 5\n", None, 81920)
    assert verdict.outcome == "signal" and "host out of memory?" in verdict.reason
    assert judge(None, 15, "step 9\n", None, None).reason == "killed by SIGTERM: step 9"


def test_other_failures_name_the_exit_code_and_last_line():
    verdict = judge(2, None, CONFIG_DUMP + "\n\n", None, 81920)
    assert verdict.outcome == "exit_code"
    assert verdict.reason == "exit code 2: ValueError: dataset path does not exist: /data/missing"
    long_line = "E" * 500
    assert len(judge(1, None, long_line, None, None).reason) <= len("exit code 1: ") + 200
    assert judge(3, None, "", None, None).reason == "exit code 3"


def test_the_simulators_oom_is_classified_as_oom(machine):
    """The fake job's stderr is the text the scheduler will judge: the two must agree."""
    code, _out, err = machine.run_job("0", "--mem", 100, "--alloc", 204800, "--seconds", 1, "--ramp", 0.05)
    verdict = judge(code, None, err, None, 81920)
    assert verdict.outcome == "oom" and verdict.impossible
    assert verdict.reason == "requested 200.00 GiB but the GPU has 80.00 GiB: can never fit"


# --- read_tail and last_lines ---------------------------------------------------------------


def test_read_tail_of_missing_file_is_empty(tmp_path):
    assert read_tail(str(tmp_path / "nope.log")) == ""
    assert read_tail(str(tmp_path)) == ""


def test_read_tail_reads_only_the_end_of_a_huge_sparse_file(tmp_path):
    path = tmp_path / "huge.log"
    with open(path, "wb") as handle:
        handle.truncate(200 * 1024 * 1024)
        handle.seek(0, os.SEEK_END)
        handle.write(b"\x00\x01\xff\xfe\x1b[31mred\x1b[0m junk\x07 \xe2\x82" + b"x" * 100 + TORCH2_OOM.encode())
    tracemalloc.start()
    try:
        text = read_tail(str(path), max_bytes=4096)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert len(text.encode("utf-8")) <= 4096 * 3
    assert "\x00" not in text and "\x1b" not in text and "\x07" not in text
    assert detect_oom(text).requested_mib == pytest.approx(2048.0)


def test_read_tail_handles_no_newlines_and_partial_utf8(tmp_path):
    path = tmp_path / "one-line.log"
    path.write_bytes("é".encode() * 5000)
    text = read_tail(str(path), max_bytes=1001)
    assert text == "é" * 500
    path.write_bytes(b"progress 10%\rprogress 50%\rprogress 100%\r\nDone\tok\n")
    assert read_tail(str(path)) == "progress 10%\nprogress 50%\nprogress 100%\nDone\tok\n"


def test_last_lines_bounds_lines_and_chars():
    text = "\n".join("line %d" % i for i in range(100)) + "\n\n"
    assert last_lines(text, n=3) == "line 97\nline 98\nline 99"
    assert last_lines(text, n=50, max_chars=10) == "98\nline 99"
    assert last_lines("", n=5) == ""


def test_oominfo_is_a_frozen_record():
    oom = OomInfo("torch", "x", 1.0, 2.0)
    with pytest.raises(Exception):
        oom.kind = "other"
