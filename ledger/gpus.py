"""GPU providers: read which GPUs exist and how much memory is used on them.

A provider is small on purpose (``name``, ``read()``, ``job_env()``, ``job_path_prefixes()``),
so a Slurm or other backend is one new class. ``read()`` never raises for a broken world: a
missing binary, a hang, a driver mismatch or garbage output become ``snapshot.error`` (one
line), and a single GPU that reports ``[N/A]``/``ERR!`` gets its own ``error`` instead of a
guessed number. The scheduler launches nothing on what it cannot read.

The simulator provider runs the simulated nvidia-smi through the same subprocess and parser
as the real one, so tests on machines without GPUs exercise the production path.
"""

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import LedgerError

GPU_QUERY = ("index", "uuid", "memory.used", "memory.total")
APPS_QUERY = ("gpu_uuid", "pid", "used_memory")
#: What nvidia-smi prints in place of a value it cannot read.
UNREADABLE_MARKERS = ("[N/A]", "[Not Supported]", "ERR!", "[Unknown Error]", "[GPU requires reset]",
                      "[Insufficient Permissions]", "[GPU Lost]")
#: Lines that mean "nothing here can be trusted", wherever they appear.
FATAL_MARKERS = ("No devices were found", "Failed to initialize NVML", "NVIDIA-SMI has failed",
                 "Unable to determine the device handle", "Driver Not Loaded")
MAX_REASON_CHARS = 200

_MIB_RE = re.compile(r"^(\d+)(?:\s*MiB)?$")
_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as read. ``used_mib``/``total_mib`` are None exactly when ``error`` says why."""

    index: int
    uuid: str
    used_mib: Optional[int]
    total_mib: Optional[int]
    error: Optional[str] = None


@dataclass(frozen=True)
class App:
    """A compute process on a GPU; ``used_mib`` is None when the driver does not say."""

    gpu_uuid: str
    pid: int
    used_mib: Optional[int]


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of the machine. ``error`` set: the reading as a whole cannot be trusted.

    ``warnings`` holds lines that were skipped (driver warnings, junk) while the rest parsed.
    """

    gpus: Dict[int, GpuInfo]
    apps: Tuple[App, ...] = ()
    error: Optional[str] = None
    warnings: Tuple[str, ...] = ()

    def readable(self, index):
        """True when this GPU's memory use is known (and the reading as a whole is sound)."""
        info = self.gpus.get(index)
        return (self.error is None and info is not None and info.error is None
                and info.used_mib is not None and info.total_mib is not None)

    def apps_on(self, index):
        info = self.gpus.get(index)
        return tuple(a for a in self.apps if info is not None and a.gpu_uuid == info.uuid)


def one_line(text, limit=MAX_REASON_CHARS):
    """Control characters out, whitespace collapsed, trimmed: safe to put in an event."""
    text = " ".join(_CONTROL_RE.sub(" ", text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_fatal(line):
    return any(marker in line for marker in FATAL_MARKERS)


def parse_mib(value):
    """"81920" or "81920 MiB" -> (81920, None); "[N/A]" -> (None, "reads [N/A]")."""
    value = value.strip()
    match = _MIB_RE.match(value)
    if match:
        return int(match.group(1)), None
    if value in UNREADABLE_MARKERS or value.startswith("["):
        return None, "reads %s" % value
    return None, "unreadable value %r" % one_line(value, 40)


def _data_rows(text, header, problems):
    """Yield (line, cells) for each csv row of nvidia-smi output that is not blank, not the
    header row (first cell ``header``) and not a fatal driver message; fatal messages go to
    ``problems`` so that the caller reports them instead of parsing them as data."""
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        if is_fatal(line):
            problems.append(one_line(line))
            continue
        cells = [c.strip() for c in line.split(",")]
        if cells[0].lower() != header:
            yield line, cells


def parse_gpu_query(text):
    """Parse ``--query-gpu=index,uuid,memory.used,memory.total`` (csv, any header/units mix).

    Returns ({index: GpuInfo}, problems). A line that is not a GPU row is a problem, never a
    GPU; a GPU row whose memory is unreadable is a GpuInfo with ``error`` set.
    """
    gpus = {}
    problems = []
    for line, cells in _data_rows(text, "index", problems):
        if len(cells) != len(GPU_QUERY) or not cells[0].isdigit() or not _UUID_RE.match(cells[1]):
            problems.append("unexpected line: %s" % one_line(line, 120))
            continue
        index, uuid = int(cells[0]), cells[1]
        used, used_problem = parse_mib(cells[2])
        total, total_problem = parse_mib(cells[3])
        error = None
        if used_problem or total_problem:
            error = "; ".join(p for p in (
                used_problem and "memory.used " + used_problem,
                total_problem and "memory.total " + total_problem) if p)
        elif used > total:
            error = "memory.used %d MiB exceeds memory.total %d MiB" % (used, total)
        if index in gpus:
            problems.append("GPU %d listed twice" % index)
            error = "listed twice by nvidia-smi"
        if error:
            used = total = None
        gpus[index] = GpuInfo(index, uuid, used, total, error)
    return gpus, problems


def parse_apps_query(text):
    """Parse ``--query-compute-apps=gpu_uuid,pid,used_memory``; returns (apps tuple, problems)."""
    apps = []
    problems = []
    for line, cells in _data_rows(text, "gpu_uuid", problems):
        if len(cells) != len(APPS_QUERY) or not _UUID_RE.match(cells[0]) or not cells[1].isdigit():
            problems.append("unexpected line: %s" % one_line(line, 120))
            continue
        used, _problem = parse_mib(cells[2])
        apps.append(App(cells[0], int(cells[1]), used))
    return tuple(apps), problems


class GpuProvider:
    """The interface the scheduler uses. Subclasses fill in ``read``."""

    name = "gpu-provider"

    def read(self):
        """-> GpuSnapshot; never raises for problems of the GPU tooling."""
        raise NotImplementedError

    def job_env(self):
        """Variables to set verbatim in a launched job's environment."""
        return {}

    def job_path_prefixes(self):
        """{"PATH": dir, ...}: folders the launcher prepends (with os.pathsep) to path-like
        variables of a launched job. Kept apart from ``job_env`` so nothing is overwritten."""
        return {}


class NvidiaSmiProvider(GpuProvider):
    """Reads GPUs by running nvidia-smi twice (GPUs, then compute apps) with a timeout."""

    name = "nvidia-smi"

    def __init__(self, binary="nvidia-smi", timeout=10.0, env=None):
        self.binary = binary
        self.timeout = float(timeout)
        self.env = dict(env) if env is not None else None

    def read(self):
        text, error = self._run(["--query-gpu=" + ",".join(GPU_QUERY), "--format=csv,noheader,nounits"])
        if error:
            return GpuSnapshot({}, (), error)
        gpus, problems = parse_gpu_query(text)
        fatal = [p for p in problems if is_fatal(p)]
        if fatal:
            return GpuSnapshot({}, (), "nvidia-smi: %s" % fatal[0])
        if not gpus:
            detail = problems[0] if problems else "no GPUs listed"
            return GpuSnapshot({}, (), one_line("nvidia-smi: unreadable output: %s" % detail))
        text, error = self._run(["--query-compute-apps=" + ",".join(APPS_QUERY), "--format=csv,noheader,nounits"])
        if error:
            return GpuSnapshot(gpus, (), "compute-apps query failed: %s" % error, tuple(problems))
        apps, app_problems = parse_apps_query(text)
        fatal = [p for p in app_problems if is_fatal(p)]
        if fatal:
            return GpuSnapshot(gpus, apps, "nvidia-smi: %s" % fatal[0], tuple(problems))
        return GpuSnapshot(gpus, apps, None, tuple(problems + app_problems))

    @property
    def label(self):
        return os.path.basename(self.binary) or self.binary

    def _run(self, args):
        """(stdout text, None) or (None, one-line reason). Kills the whole process group on timeout."""
        env = None if self.env is None else dict(os.environ, **self.env)
        try:
            proc = subprocess.Popen([self.binary] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except FileNotFoundError:
            where = "on PATH" if os.sep not in self.binary else "at %s" % self.binary
            return None, "%s not found %s" % (self.label, where)
        except PermissionError:
            return None, "%s at %s is not executable" % (self.label, self.binary)
        except OSError as error:
            return None, "%s could not be started: %s" % (self.label, error.strerror or error)
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            return None, "%s timed out after %g s" % (self.label, self.timeout)
        out_text = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            return None, self._failure(proc.returncode, out_text, err.decode("utf-8", "replace"))
        return out_text, None

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            # Something outside the group holds the pipes; stop waiting for it.
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
            proc.wait()

    def _failure(self, code, out_text, err_text):
        lines = [one_line(l) for l in (err_text + "\n" + out_text).splitlines() if l.strip()]
        fatal = [l for l in lines if is_fatal(l)]
        if fatal:
            return one_line("%s: %s" % (self.label, fatal[0]))
        if code < 0:
            return "%s was killed by signal %d" % (self.label, -code)
        if lines:
            return one_line("%s exited with code %d: %s" % (self.label, code, lines[0]))
        return "%s exited with code %d" % (self.label, code)


class SimProvider(NvidiaSmiProvider):
    """The GPU simulator, read through its nvidia-smi shim (the real parser, the real subprocess).

    Jobs launched under it need ``LEDGER_SIM_DIR`` (``job_env``) and the shim folder and the
    ledger package on PATH/PYTHONPATH (``job_path_prefixes``), so ``nvidia-smi`` and
    ``python3 -m ledger.sim job`` work inside them.
    """

    def __init__(self, state_dir, spec, lag=2.0, timeout=10.0):
        from . import sim

        self.state_dir = os.path.abspath(state_dir)
        self.spec = spec.strip()
        self.lag = float(lag)
        sim.init_state(self.state_dir, self.spec, self.lag)
        self.bin_dir = sim.install_shim(self.state_dir)
        self.package_root = sim.PACKAGE_ROOT
        super().__init__(binary=os.path.join(self.bin_dir, "nvidia-smi"), timeout=timeout)

    @property
    def name(self):
        return "sim:%s" % self.spec

    def job_env(self):
        return {"LEDGER_SIM_DIR": self.state_dir}

    def job_path_prefixes(self):
        return {"PATH": self.bin_dir, "PYTHONPATH": self.package_root}


def compose_job_env(base_env, provider):
    """A launched job's environment: ``base_env`` plus the provider's variables and prefixes (pure)."""
    env = dict(base_env)
    env.update(provider.job_env())
    for key, prefix in provider.job_path_prefixes().items():
        env[key] = prefix + os.pathsep + env[key] if env.get(key) else prefix
    return env


def provider_from_spec(spec, ledger_dir):
    """``None``/"nvidia-smi" -> NvidiaSmiProvider; "sim:4x80G[,lag=1.5][,timeout=10]" -> SimProvider in
    <ledger_dir>/sim."""
    text = (spec or "").strip()
    if text in ("", "nvidia-smi"):
        return NvidiaSmiProvider()
    if not text.startswith("sim:"):
        raise LedgerError("gpu_provider %r: expected 'nvidia-smi' or 'sim:NxSIZE' like 'sim:4x80G'" % (spec,))
    from .sim import parse_spec

    gpu_spec, *options = [part.strip() for part in text[len("sim:"):].split(",")]
    numbers = {"lag": 2.0, "timeout": 10.0}      # timeout: how long a (faulted, hanging) read may take
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if key not in numbers or not sep:
            raise LedgerError("gpu_provider %r: unknown option %r (only 'lag=SECONDS', 'timeout=SECONDS')"
                              % (spec, option))
        try:
            numbers[key] = float(value)
        except ValueError:
            numbers[key] = -1.0
        if not numbers[key] >= 0 or (key == "timeout" and not numbers[key] > 0):
            raise LedgerError("gpu_provider %r: %s must be a number of seconds %s, got %r"
                              % (spec, key, ">= 0" if key == "lag" else "> 0", value))
    lag = numbers["lag"]
    try:
        parse_spec(gpu_spec)
    except ValueError as error:
        raise LedgerError("gpu_provider %r: %s" % (spec, error))
    from .localdisk import make_private_dirs
    make_private_dirs(ledger_dir)       # the simulator may be first to need the ledger's folder
    return SimProvider(os.path.join(ledger_dir, "sim"), gpu_spec, lag, timeout=numbers["timeout"])
