"""The simulator's shared state: one JSON file in a folder, changed only under an fcntl lock.

Many processes touch it at once (fake jobs registering memory, nvidia-smi readers noticing
dead pids, tests adding foreign load), so every read-modify-write happens while holding an
exclusive ``flock`` on ``<dir>/lock`` and the file is replaced atomically. SIGTERM and SIGINT
are blocked while the lock is held so a fake job killed mid-write never leaves half a file.

Memory model: an allocation counts against its GPU until ``released_at`` has passed. A job
that exits (or is noticed dead) gets ``released_at = now + lag``: the driver frees memory
late, which is exactly what makes the next wave of a batch OOM on a GPU that looks idle.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import tempfile
import time

STATE_FILE = "state.json"
LOCK_FILE = "lock"
FAULT_MODES = ("none", "hang", "garbage", "not_found", "mismatch", "na", "err", "warning")
#: Fake pids for foreign load sit above Linux's largest possible pid (2**22), so they can
#: never be mistaken for a live process of ours.
FOREIGN_PID_BASE = 5000000

_SPEC_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*([GgMm])(?:i?[Bb])?\s*$")
_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def parse_spec(spec):
    """"4x80G" -> (4, 81920). SIZE is a number with G (GiB) or M (MiB); raises ValueError."""
    match = _SPEC_RE.match(str(spec or ""))
    if not match:
        raise ValueError(
            "GPU spec %r: expected NxSIZE like '4x80G', '2x24G' or '1x40960M'" % (spec,)
        )
    count, size, unit = int(match.group(1)), float(match.group(2)), match.group(3).upper()
    total_mib = int(round(size * 1024)) if unit == "G" else int(round(size))
    if not 1 <= count <= 64:
        raise ValueError("GPU spec %r: GPU count must be between 1 and 64" % (spec,))
    if total_mib < 1:
        raise ValueError("GPU spec %r: memory size must be positive" % (spec,))
    return count, total_mib


def gpu_uuid(index):
    """A deterministic, real-looking uuid that still says it is simulated."""
    digest = hashlib.sha1(("ledger-sim-gpu-%d" % index).encode()).hexdigest()
    return "GPU-%s-%s-%s-%s-sim%d" % (digest[:8], digest[8:12], digest[12:16], digest[16:20], index)


def gpu_name(total_mib):
    return "NVIDIA Sim GPU %dGB" % round(total_mib / 1024.0)


def resolve_dir(state_dir=None):
    """The state folder from an explicit argument or LEDGER_SIM_DIR; ValueError if neither."""
    state_dir = state_dir or os.environ.get("LEDGER_SIM_DIR")
    if not state_dir:
        raise ValueError("no simulator state folder: pass --dir or set LEDGER_SIM_DIR")
    return os.path.abspath(state_dir)


@contextlib.contextmanager
def locked(state_dir):
    """Hold the folder's exclusive lock (signals that end a process wait until release)."""
    os.makedirs(state_dir, exist_ok=True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
    try:
        with open(os.path.join(state_dir, LOCK_FILE), "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def load(state_dir):
    """The state dict; ValueError when the folder was never initialised."""
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(
            "simulator state %s is not initialised: run 'python3 -m ledger.sim init --dir %s --gpus 4x80G'"
            % (state_dir, state_dir)
        )


def save(state_dir, state):
    """Replace the state file atomically (callers hold the lock)."""
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(state_dir, STATE_FILE))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pid_alive(pid):
    """True while the process exists and is not a zombie (a SIGKILLed child not yet reaped is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def counts(alloc, now):
    """Does this allocation still occupy memory at ``now``?"""
    released_at = alloc.get("released_at")
    return released_at is None or now < released_at


def refresh(state, now):
    """Notice dead job pids (release them after the lag) and drop fully released allocations.

    Returns True when something changed and the state must be saved.
    """
    changed = False
    lag = state["config"]["lag"]
    for alloc in state["allocations"]:
        if alloc["kind"] == "job" and alloc.get("released_at") is None and not pid_alive(alloc["pid"]):
            alloc["released_at"] = now + lag
            changed = True
    kept = [a for a in state["allocations"] if counts(a, now)]
    if len(kept) != len(state["allocations"]):
        state["allocations"] = kept
        changed = True
    return changed


@contextlib.contextmanager
def transaction(state_dir, now=None):
    """Lock, load, refresh; yield (state, now); save if the body or the refresh changed it.

    The body signals a change by setting ``state["_dirty"] = True``.
    """
    with locked(state_dir):
        state = load(state_dir)
        now = time.time() if now is None else now
        dirty = refresh(state, now)
        yield state, now
        dirty = state.pop("_dirty", False) or dirty
        if dirty:
            save(state_dir, state)


def init_state(state_dir, spec, lag=2.0):
    """Create (or keep) a simulated machine. Idempotent.

    Re-initialising with the same GPU count and size keeps allocations and fault (the lag is
    updated); a different spec describes a different machine, so its state starts afresh.
    """
    count, total_mib = parse_spec(spec)
    lag = float(lag)
    if lag < 0:
        raise ValueError("lag must be >= 0 seconds, got %r" % (lag,))
    state_dir = os.path.abspath(state_dir)
    with locked(state_dir):
        try:
            state = load(state_dir)
        except ValueError:
            state = None
        same = state is not None and (state["config"]["gpus"], state["config"]["total_mib"]) == (count, total_mib)
        if not same:
            state = {
                "version": 1,
                "config": {
                    "gpus": count,
                    "total_mib": total_mib,
                    "spec": "%dx%s" % (count, _size_text(total_mib)),
                    "uuids": [gpu_uuid(i) for i in range(count)],
                    "lag": lag,
                    "fault": {"mode": "none", "gpu": 0},
                },
                "allocations": [],
                "next_id": 1,
            }
        state["config"]["lag"] = lag
        save(state_dir, state)
        return dict(state["config"])


def _size_text(total_mib):
    return "%dG" % (total_mib // 1024) if total_mib % 1024 == 0 else "%dM" % total_mib


def check_gpu(state, gpu):
    count = state["config"]["gpus"]
    if not isinstance(gpu, int) or not 0 <= gpu < count:
        raise ValueError("GPU %r does not exist: the simulator has GPUs 0..%d" % (gpu, count - 1))


def add_load(state_dir, gpu, mib, name="foreign"):
    """Put a foreign process's memory on a GPU (no live pid behind it). Returns its id."""
    if int(mib) < 0:
        raise ValueError("load must be >= 0 MiB, got %r" % (mib,))
    with transaction(resolve_dir(state_dir)) as (state, now):
        check_gpu(state, gpu)
        number = state["next_id"]
        state["next_id"] = number + 1
        alloc_id = "load-%d" % number
        state["allocations"].append({
            "id": alloc_id, "kind": "foreign", "gpu": gpu, "pid": FOREIGN_PID_BASE + number,
            "mib": int(mib), "name": name or "foreign", "released_at": None, "since": now,
        })
        state["_dirty"] = True
        return alloc_id


def remove_load(state_dir, gpu=None, id=None):
    """Remove foreign load by id or all of it on one GPU (immediately). Returns how many went."""
    if gpu is None and id is None:
        raise ValueError("unload needs a GPU index or a load id")
    with transaction(resolve_dir(state_dir)) as (state, now):
        if gpu is not None:
            check_gpu(state, gpu)

        def matches(alloc):
            return alloc["kind"] == "foreign" and (id is None or alloc["id"] == id) and (
                gpu is None or alloc["gpu"] == gpu
            )

        before = len(state["allocations"])
        state["allocations"] = [a for a in state["allocations"] if not matches(a)]
        removed = before - len(state["allocations"])
        if id is not None and removed == 0:
            raise ValueError("no foreign load with id %r" % (id,))
        state["_dirty"] = removed > 0
        return removed


def set_fault(state_dir, mode, gpu=None):
    """Make the simulated nvidia-smi misbehave (``mode='none'`` heals it)."""
    if mode not in FAULT_MODES:
        raise ValueError("fault mode %r: expected one of %s" % (mode, ", ".join(FAULT_MODES)))
    with transaction(resolve_dir(state_dir)) as (state, now):
        gpu = 0 if gpu is None else gpu
        check_gpu(state, gpu)
        state["config"]["fault"] = {"mode": mode, "gpu": gpu}
        state["_dirty"] = True


def view(state, now):
    """Per-GPU dicts from an already refreshed state (pure)."""
    config = state["config"]
    gpus = []
    for index in range(config["gpus"]):
        apps = [dict(a) for a in state["allocations"] if a["gpu"] == index and counts(a, now)]
        used = sum(a["mib"] for a in apps)
        busy = any(a["kind"] == "job" and a.get("released_at") is None for a in apps)
        gpus.append({
            "index": index,
            "uuid": config["uuids"][index],
            "name": gpu_name(config["total_mib"]),
            "total_mib": config["total_mib"],
            "used_mib": used,
            "free_mib": max(config["total_mib"] - used, 0),
            "utilization": 97 if busy else 0,
            "apps": apps,
        })
    return gpus


def snapshot(state_dir):
    """What nvidia-smi would see now: a list of per-GPU dicts (index, uuid, name, total_mib,
    used_mib, free_mib, utilization, apps)."""
    with transaction(resolve_dir(state_dir)) as (state, now):
        return view(state, now)


def read_config(state_dir):
    with transaction(resolve_dir(state_dir)) as (state, now):
        return dict(state["config"])


def reserve(state_dir, pid, gpu, want_mib, name):
    """Grow (or set) pid's allocation on a GPU to ``want_mib`` if it fits.

    Returns (ok, info) where info has total_mib, own_mib (before) and free_mib (for everyone,
    before this request): what a CUDA allocator would know when it fails.
    """
    with transaction(state_dir) as (state, now):
        check_gpu(state, gpu)
        total = state["config"]["total_mib"]
        mine = [a for a in state["allocations"]
                if a["kind"] == "job" and a["pid"] == pid and a["gpu"] == gpu and a.get("released_at") is None]
        own = mine[0]["mib"] if mine else 0
        others = sum(a["mib"] for a in state["allocations"]
                     if a["gpu"] == gpu and counts(a, now) and not any(a is m for m in mine))
        info = {"total_mib": total, "own_mib": own, "free_mib": max(total - others - own, 0)}
        if want_mib > total - others:
            return False, info
        if mine:
            mine[0]["mib"] = int(want_mib)
        else:
            state["allocations"].append({
                "id": "job-%d-%d" % (pid, gpu), "kind": "job", "gpu": gpu, "pid": pid,
                "mib": int(want_mib), "name": name, "released_at": None, "since": now,
            })
        state["_dirty"] = True
        return True, info


def release(state_dir, pid):
    """Mark all of pid's live allocations as released after the configured lag."""
    with transaction(state_dir) as (state, now):
        for alloc in state["allocations"]:
            if alloc["kind"] == "job" and alloc["pid"] == pid and alloc.get("released_at") is None:
                alloc["released_at"] = now + state["config"]["lag"]
                state["_dirty"] = True
