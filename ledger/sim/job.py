"""A fake training job: takes GPU memory like a PyTorch run, prints like one, dies like one.

It reads CUDA_VISIBLE_DEVICES (indices or uuids; all simulated GPUs are identical, so
PCI_BUS_ID order and CUDA's default order agree and both equal nvidia-smi's index order),
ramps its memory up in a few steps, trains for a while, writes an output file and exits with
the code it was told. When a GPU lacks room it prints a real-looking PyTorch 2 OOM traceback
and exits 1, so the scheduler's OOM detection is exercised against the text it will meet.
On exit or SIGTERM it releases its memory late (after the simulator's lag); a SIGKILLed job
is noticed dead by the next nvidia-smi reader.
"""

import json
import os
import signal
import sys
import time

from . import state as sim_state

RAMP_STEPS = 4
PROCESS_NAME = "python"


class Terminated(BaseException):
    """Raised by the SIGTERM handler so cleanup runs outside any held lock."""


class OutOfMemory(Exception):
    def __init__(self, logical_index, tried_mib, info):
        super().__init__("CUDA out of memory")
        self.logical_index = logical_index
        self.tried_mib = tried_mib
        self.info = info


def format_size(mib):
    """PyTorch's allocator wording: '2.00 GiB', '512.00 MiB'."""
    size = float(mib) * 1024 * 1024
    if size <= 1024:
        return "%d bytes" % size
    if size <= 1024 ** 2:
        return "%.2f KiB" % (size / 1024)
    if size <= 1024 ** 3:
        return "%.2f MiB" % (size / 1024 ** 2)
    return "%.2f GiB" % (size / 1024 ** 3)


def oom_traceback(error):
    """The stderr of a PyTorch 2 training script that ran out of GPU memory."""
    info = error.info
    own = info["own_mib"]
    message = (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate %s. GPU %d has a total capacity of %s "
        "of which %s is free. Including non-PyTorch memory, this process has %s memory in use. Of the allocated "
        "memory %s is allocated by PyTorch, and %s is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
        % (format_size(error.tried_mib), error.logical_index, format_size(info["total_mib"]),
           format_size(info["free_mib"]), format_size(own), format_size(own * 0.9), format_size(own * 0.1))
    )
    site = "/opt/conda/lib/python3.10/site-packages/torch"
    return "\n".join([
        "Traceback (most recent call last):",
        '  File "/workspace/train.py", line 214, in <module>',
        "    main()",
        '  File "/workspace/train.py", line 187, in main',
        "    loss = model(input_ids=batch[\"input_ids\"], labels=batch[\"labels\"]).loss",
        '  File "%s/nn/modules/module.py", line 1553, in _wrapped_call_impl' % site,
        "    return self._call_impl(*args, **kwargs)",
        '  File "%s/nn/modules/module.py", line 1562, in _call_impl' % site,
        "    return forward_call(*args, **kwargs)",
        '  File "/workspace/model.py", line 96, in forward',
        "    attn = torch.softmax(scores, dim=-1)",
        message,
        "",
    ])


def visible_gpus(config):
    """Indices named by CUDA_VISIBLE_DEVICES; ValueError when none is visible."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        raise ValueError("no GPU visible: CUDA_VISIBLE_DEVICES is %s" % ("unset" if raw is None else "empty"))
    indices = []
    for token in raw.split(","):
        token = token.strip()
        if token.isdigit() and int(token) < config["gpus"]:
            indices.append(int(token))
        elif token in config["uuids"]:
            indices.append(config["uuids"].index(token))
        else:
            raise ValueError("no GPU visible: CUDA_VISIBLE_DEVICES=%r names no GPU of this %d-GPU simulator"
                             % (raw, config["gpus"]))
    return indices


def take(state_dir, gpus, want_mib, tried_mib):
    """Hold ``want_mib`` on every visible GPU, or raise OutOfMemory for the first that lacks room."""
    for logical, gpu in enumerate(gpus):
        ok, info = sim_state.reserve(state_dir, os.getpid(), gpu, want_mib, PROCESS_NAME)
        if not ok:
            raise OutOfMemory(logical, tried_mib, info)


def ramp(state_dir, gpus, mem_mib, ramp_seconds):
    """Grow to ``mem_mib`` in a few steps, like model weights, optimizer state, then activations."""
    held = 0
    for step in range(1, RAMP_STEPS + 1):
        target = -(-mem_mib * step // RAMP_STEPS)
        take(state_dir, gpus, target, target - held)
        held = target
        print("[rank0] allocated %.2f GiB on cuda:0 (step %d/%d of model setup)" % (held / 1024.0, step, RAMP_STEPS),
              flush=True)
        time.sleep(ramp_seconds / RAMP_STEPS)
    return held


def train(seconds):
    """Print loss lines for ``seconds``."""
    started = time.time()
    interval = max(0.1, seconds / 20.0)
    step = 0
    while True:
        left = seconds - (time.time() - started)
        if left <= 0:
            break
        time.sleep(min(interval, left))
        step += 1
        print("epoch 1 step %d loss %.4f lr 3.0e-04 tokens/s 41230" % (step, 2.5 / (1 + 0.1 * step)), flush=True)


def write_output(path, args, gpus):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp-%d" % os.getpid()
    with open(tmp, "w") as handle:
        json.dump({"args": args, "gpus": gpus, "pid": os.getpid(), "finished_at": time.time()}, handle)
    os.replace(tmp, path)
    print("saved results to %s" % path, flush=True)


def _raise_terminated(signum, frame):
    raise Terminated()


def run(state_dir, args):
    """Run the fake job; returns its exit code (SIGTERM re-raises the signal after cleanup)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        config = sim_state.read_config(state_dir)
        gpus = visible_gpus(config)
    except ValueError as error:
        sys.stderr.write("RuntimeError: %s\n" % error)
        return 1
    print("Using CUDA devices %s (pid %d)" % (",".join(map(str, gpus)), os.getpid()), flush=True)
    try:
        held = ramp(state_dir, gpus, args["mem"], args["ramp"])
        if args.get("alloc"):
            take(state_dir, gpus, held + args["alloc"], args["alloc"])
        train(args["seconds"])
        if args.get("out"):
            write_output(args["out"], args, gpus)
        if args.get("hang_after_output"):
            print("training finished; process lingers holding GPU memory", flush=True)
            while True:
                time.sleep(3600)
        return args["exit"]
    except OutOfMemory as error:
        sys.stdout.flush()
        sys.stderr.write(oom_traceback(error))
        sys.stderr.flush()
        return 1
    except Terminated:
        sim_state.release(state_dir, os.getpid())
        print("received SIGTERM, shutting down", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return 143
    except KeyboardInterrupt:
        return 130
    finally:
        sim_state.release(state_dir, os.getpid())
