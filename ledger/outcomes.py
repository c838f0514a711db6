"""Classify a finished attempt from its exit code, signal, output check and log tail.

Pure apart from ``read_tail``, which reads at most ``max_bytes`` from the end of a log so a
100 GB log full of progress bars costs the same as a small one. The exit code decides first:
a job that printed an OOM, recovered and exited 0 succeeded. OOM patterns are anchored on
the exception text each framework really prints, so a config dump that merely mentions
memory is not an OOM; the last matching line wins (that is the one that killed the job).
"""

import os
import re
from dataclasses import dataclass
from typing import Optional

OUTCOMES = ("success", "oom", "exit_code", "signal", "missing_output")
MAX_REASON_LINE = 200

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_JUNK_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

#: (kind, pattern) — checked on each line from the end of the log.
_OOM_PATTERNS = (
    ("torch", re.compile(r"(?:torch\.(?:cuda\.)?OutOfMemoryError|RuntimeError): CUDA out of memory")),
    ("cublas", re.compile(r"CUBLAS_STATUS_ALLOC_FAILED")),
    ("cuda", re.compile(r"CUDA error: out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY")),
    ("xla", re.compile(r"RESOURCE_EXHAUSTED:.*(?:[Oo]ut of memory|[Ff]ailed to allocate)")),
    ("tensorflow", re.compile(r"OOM when allocating tensor")),
)
_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"
_TRIED_RE = re.compile(r"Tried to allocate " + _SIZE)
_CAPACITY_RES = (
    re.compile(r"total capacity of " + _SIZE),
    re.compile(_SIZE + r" total capacity"),
)
_XLA_BYTES_RES = (
    re.compile(r"(?:allocate|allocating)\s+(\d+)\s*bytes"),
    re.compile(r"\((\d+)B\)"),
    re.compile(r"(?:allocate|allocating)(?: request for)?\s+" + _SIZE),
)
_TF_SHAPE_RE = re.compile(r"shape\s*\[([\d,\s]*)\]\s*and type (\w+)")
_UNIT_MIB = {
    "bytes": 1.0 / 2 ** 20, "B": 1.0 / 2 ** 20, "KiB": 1.0 / 1024, "KB": 1.0 / 1024,
    "MiB": 1.0, "MB": 1.0, "GiB": 1024.0, "GB": 1024.0, "TiB": 1024.0 ** 2, "TB": 1024.0 ** 2,
}
_DTYPE_BYTES = {"float": 4, "float32": 4, "half": 2, "float16": 2, "bfloat16": 2, "double": 8, "float64": 8,
                "int32": 4, "int64": 8, "int8": 1, "uint8": 1, "int16": 2, "bool": 1}


@dataclass(frozen=True)
class OomInfo:
    """An out-of-memory line found in a log; sizes in MiB when the framework said them."""

    kind: str
    line: str
    requested_mib: Optional[float] = None
    capacity_mib: Optional[float] = None


@dataclass(frozen=True)
class Verdict:
    """How an attempt ended. ``impossible``: it asked for more memory than the GPU has."""

    outcome: str
    reason: str
    oom: Optional[OomInfo] = None
    impossible: bool = False


def clean_text(text):
    """Strip ANSI colours and control junk (keeping newlines and tabs); carriage returns
    (progress bars redrawing) become newlines so the last state is the last line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _JUNK_RE.sub("", _ANSI_RE.sub("", text))


def read_tail(path, max_bytes=65536):
    """The last ``max_bytes`` of a file as clean text; "" when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            start = max(0, size - max_bytes)
            handle.seek(start)
            data = handle.read(max_bytes)
    except (OSError, ValueError):
        return ""
    if start > 0:
        # Do not start half-way through a UTF-8 character.
        skip = 0
        while skip < min(3, len(data)) and 0x80 <= data[skip] <= 0xBF:
            skip += 1
        data = data[skip:]
    return clean_text(data.decode("utf-8", errors="replace"))


def size_to_mib(number, unit):
    return float(number) * _UNIT_MIB[unit]


def format_mib(mib):
    """1024 -> '1.00 GiB', 512 -> '512.00 MiB'."""
    return "%.2f GiB" % (mib / 1024.0) if mib >= 1024 else "%.2f MiB" % mib


def _first_size(regexes, line):
    for regex in regexes:
        match = regex.search(line)
        if match:
            return match
    return None


def _requested_mib(kind, line):
    if kind == "xla":
        match = _first_size(_XLA_BYTES_RES, line)
        if not match:
            return None
        if match.lastindex == 1:
            return int(match.group(1)) / float(2 ** 20)
        return size_to_mib(match.group(1), match.group(2))
    if kind == "tensorflow":
        match = _TF_SHAPE_RE.search(line)
        if not match or match.group(2) not in _DTYPE_BYTES:
            return None
        elements = 1
        for dim in match.group(1).split(","):
            if dim.strip():
                elements *= int(dim)
        return elements * _DTYPE_BYTES[match.group(2)] / float(2 ** 20)
    match = _TRIED_RE.search(line)
    return size_to_mib(match.group(1), match.group(2)) if match else None


def _capacity_mib(line):
    match = _first_size(_CAPACITY_RES, line)
    return size_to_mib(match.group(1), match.group(2)) if match else None


MAX_OOM_LINE = 1000
OOM_LINE_BEFORE = 200


def detect_oom(text):
    """The last GPU out-of-memory line in ``text`` as an OomInfo, or None."""
    for line in reversed((text or "").splitlines()):
        for kind, pattern in _OOM_PATTERNS:
            match = pattern.search(line)
            if match:
                # A log without newlines (binary junk, progress bars) makes one huge "line": keep
                # the message itself, from a little before the match, at most MAX_OOM_LINE chars.
                line = line[max(0, match.start() - OOM_LINE_BEFORE):].strip()[:MAX_OOM_LINE]
                return OomInfo(kind, line, _requested_mib(kind, line), _capacity_mib(line))
    return None


def last_lines(text, n=20, max_chars=4000):
    """The last ``n`` non-blank lines, cut from the front to at most ``max_chars``."""
    lines = [line.rstrip() for line in (text or "").splitlines() if line.strip()]
    tail = "\n".join(lines[-n:]) if n > 0 else ""
    return tail[-max_chars:] if len(tail) > max_chars else tail


def _last_line(text):
    lines = last_lines(text, n=1, max_chars=10 ** 6)
    line = " ".join(lines.split())
    return line if len(line) <= MAX_REASON_LINE else line[: MAX_REASON_LINE - 3] + "..."


def _signal_name(number):
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def _judge_oom(oom, gpu_total_mib):
    capacity = gpu_total_mib or oom.capacity_mib
    if oom.requested_mib is not None and capacity and oom.requested_mib > capacity:
        reason = "requested %s but the GPU has %s: can never fit" % (format_mib(oom.requested_mib), format_mib(capacity))
        return Verdict("oom", reason, oom, True)
    line = oom.line if len(oom.line) <= MAX_REASON_LINE else oom.line[: MAX_REASON_LINE - 3] + "..."
    return Verdict("oom", "out of GPU memory (%s): %s" % (oom.kind, line), oom, False)


def judge(exit_code, signal, log_tail, output_ok, gpu_total_mib=None, output_pattern=None):
    """Classify one finished attempt (pure).

    exit 0 (and no signal) is success unless the output check found nothing; otherwise an
    OOM in the log makes it "oom" (``impossible`` if the request exceeds the card), then a
    signal, then the exit code with the log's last line.
    """
    if exit_code == 0 and not signal:
        if output_ok is False:
            what = output_pattern if output_pattern else "(no pattern given)"
            return Verdict("missing_output", "exit 0 but output check matched nothing: %s" % what)
        return Verdict("success", "exit 0")
    oom = detect_oom(log_tail)
    if oom is not None:
        return _judge_oom(oom, gpu_total_mib)
    last = _last_line(log_tail)
    if signal:
        name = _signal_name(signal)
        if name == "SIGKILL":
            return Verdict("signal", "killed (SIGKILL; host out of memory?)")
        return Verdict("signal", "killed by %s" % name + (": %s" % last if last else ""))
    if exit_code == 137:
        return Verdict("exit_code", "killed (exit 137; host out of memory?)")
    if exit_code is None:
        return Verdict("exit_code", "exit code unknown" + (": %s" % last if last else ""))
    return Verdict("exit_code", "exit code %d" % exit_code + (": %s" % last if last else ""))
