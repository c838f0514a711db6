"""An nvidia-smi look-alike over the simulator state.

It formats answers the way the real tool does, so the code that parses real nvidia-smi is
the code under test: ``--query-gpu`` / ``--query-compute-apps`` with ``--format=csv[,noheader]
[,nounits]`` (headers keep their ``[MiB]`` even with nounits, values get `` MiB`` without it),
``-i`` to pick GPUs, ``-L``, and a small human table without arguments. Fault modes make it
hang, print junk, fail like a broken driver, or report ``[N/A]``/``ERR!`` for one GPU.
"""

import random
import sys
import time

from . import state as sim_state

DRIVER_VERSION = "535.104.05"
CUDA_VERSION = "12.2"
INVALID_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."

#: field -> (header text, unit or None, key in the per-GPU view)
GPU_FIELDS = {
    "index": ("index", None, "index"),
    "uuid": ("uuid", None, "uuid"),
    "gpu_uuid": ("uuid", None, "uuid"),
    "name": ("name", None, "name"),
    "gpu_name": ("name", None, "name"),
    "memory.used": ("memory.used [MiB]", "MiB", "used_mib"),
    "memory.total": ("memory.total [MiB]", "MiB", "total_mib"),
    "memory.free": ("memory.free [MiB]", "MiB", "free_mib"),
    "utilization.gpu": ("utilization.gpu [%]", "%", "utilization"),
}
#: field -> (header text, unit or None, key in the per-app row)
APP_FIELDS = {
    "gpu_uuid": ("gpu_uuid", None, "gpu_uuid"),
    "pid": ("pid", None, "pid"),
    "process_name": ("process_name", None, "name"),
    "name": ("process_name", None, "name"),
    "used_memory": ("used_gpu_memory [MiB]", "MiB", "mib"),
    "used_gpu_memory": ("used_gpu_memory [MiB]", "MiB", "mib"),
}
MEMORY_KEYS = ("used_mib", "total_mib", "free_mib", "mib")


class SmiExit(Exception):
    """Stop with this output and exit code (what the real tool prints before giving up)."""

    def __init__(self, code, text):
        super().__init__(text)
        self.code = code
        self.text = text


def parse_args(argv):
    """Our subset of nvidia-smi's command line -> dict; SmiExit on anything else."""
    opts = {"query_gpu": None, "query_apps": None, "format": None, "ids": None, "list": False, "help": False}
    names = {"--query-gpu": "query_gpu", "--query-compute-apps": "query_apps", "--format": "format",
             "-i": "ids", "--id": "ids"}
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, sep, value = arg.partition("=")
        if key in names:
            if not sep and not args:
                raise SmiExit(2, INVALID_ARGS)
            opts[names[key]] = value if sep else args.pop(0)
        elif arg in ("-L", "--list-gpus"):
            opts["list"] = True
        elif arg in ("-h", "--help"):
            opts["help"] = True
        else:
            raise SmiExit(2, INVALID_ARGS)
    if opts["query_gpu"] and opts["query_apps"]:
        raise SmiExit(2, INVALID_ARGS)
    return opts


def parse_format(text):
    tokens = [t.strip() for t in (text or "").split(",") if t.strip()]
    if "csv" not in tokens or any(t not in ("csv", "noheader", "nounits") for t in tokens):
        raise SmiExit(2, '"%s" is not a valid format. Supported formats: csv, noheader, nounits' % text)
    return "noheader" not in tokens, "nounits" not in tokens


def parse_fields(text, table):
    fields = [f.strip() for f in (text or "").split(",") if f.strip()]
    if not fields:
        raise SmiExit(2, INVALID_ARGS)
    for field in fields:
        if field not in table:
            raise SmiExit(2, 'Field "%s" is not a valid field to query.' % field)
    return fields


def select_gpus(gpus, ids):
    if ids is None:
        return gpus
    wanted = []
    for token in ids.split(","):
        token = token.strip()
        hits = [g for g in gpus if str(g["index"]) == token or g["uuid"] == token]
        if not hits:
            raise SmiExit(6, "No devices were found")
        wanted.extend(hits)
    return wanted


def cell(value, unit, with_units, broken):
    """One CSV value: ``broken`` replaces a memory value by what a sick GPU shows."""
    if broken is not None:
        return broken
    if unit is None or not with_units:
        return str(value)
    return "%s %s" % (value, unit)


def render_csv(rows, fields, table, with_header, with_units):
    lines = []
    if with_header:
        lines.append(", ".join(table[f][0] for f in fields))
    for row, broken in rows:
        values = []
        for field in fields:
            header, unit, key = table[field]
            bad = broken if key in MEMORY_KEYS or key == "utilization" else None
            values.append(cell(row[key], unit, with_units, bad))
        lines.append(", ".join(values))
    return "\n".join(lines) + ("\n" if lines else "")


def broken_value(fault, index):
    """What a GPU under an ``na``/``err`` fault shows instead of numbers (None: healthy)."""
    if fault["gpu"] != index:
        return None
    return {"na": "[N/A]", "err": "ERR!"}.get(fault["mode"])


def app_rows(gpus, fault):
    rows = []
    for gpu in gpus:
        for app in gpu["apps"]:
            row = {"gpu_uuid": gpu["uuid"], "pid": app["pid"], "name": app["name"], "mib": app["mib"]}
            rows.append((row, broken_value(fault, gpu["index"])))
    return rows


def human_table(gpus):
    """A small version of the plain ``nvidia-smi`` screen, for people."""
    width = 84
    bar = "+" + "-" * (width - 2) + "+"

    def row(text):
        return "| " + text.ljust(width - 4) + " |"

    lines = [time.strftime("%a %b %d %H:%M:%S %Y"), bar,
             row("NVIDIA-SMI %s (sim)   Driver Version: %s   CUDA Version: %s"
                 % (DRIVER_VERSION, DRIVER_VERSION, CUDA_VERSION)),
             bar, row("GPU  Name                           Memory-Usage          GPU-Util"), bar]
    for gpu in gpus:
        lines.append(row("%3d  %-29s  %8dMiB / %6dMiB  %7d%%" % (
            gpu["index"], gpu["name"][:29], gpu["used_mib"], gpu["total_mib"], gpu["utilization"])))
    lines += [bar, row("Processes:"), row("GPU        PID  Process name          GPU Memory Usage")]
    apps = [(g["index"], a) for g in gpus for a in g["apps"]]
    if not apps:
        lines.append(row("No running processes found"))
    for index, app in apps:
        lines.append(row("%3d  %9d  %-20s  %8dMiB" % (index, app["pid"], app["name"][:20], app["mib"])))
    lines.append(bar)
    return "\n".join(lines) + "\n"


def list_gpus(gpus):
    return "".join("GPU %d: %s (UUID: %s)\n" % (g["index"], g["name"], g["uuid"]) for g in gpus)


def garbage():
    """Random junk, including bytes that are not UTF-8."""
    rng = random.Random()
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 ,.;:[]!?#%&*()-_=+/\\|<>"
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 70))) for _ in range(rng.randint(2, 6))]
    return ("\n".join(lines) + "\n").encode() + bytes([0xFF, 0xFE, 0x00, 0x9C]) + b"\n"


def answer(state_dir, argv):
    """(exit code, stdout bytes) for one nvidia-smi invocation, or hang for the hang fault."""
    opts = parse_args(argv)
    if opts["help"]:
        return 0, b"NVIDIA System Management Interface (ledger sim): --query-gpu, --query-compute-apps, --format, -i, -L\n"
    config = sim_state.read_config(state_dir)
    fault = config["fault"]
    mode = fault["mode"]
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "garbage":
        return 0, garbage()
    if mode == "not_found":
        return 6, b"No devices were found\n"
    if mode == "mismatch":
        return 18, b"Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.113\n"
    prefix = "WARNING: infoROM is corrupted at gpu 00000000:07:00.0\n" if mode == "warning" else ""
    gpus = select_gpus(sim_state.snapshot(state_dir), opts["ids"])
    if opts["list"]:
        return 0, (prefix + list_gpus(gpus)).encode()
    if opts["query_gpu"] is None and opts["query_apps"] is None:
        if opts["format"] is not None:
            raise SmiExit(2, INVALID_ARGS)
        return 0, (prefix + human_table(gpus)).encode()
    if opts["format"] is None:
        raise SmiExit(2, "Option --format is required when using --query-gpu or --query-compute-apps.")
    with_header, with_units = parse_format(opts["format"])
    if opts["query_gpu"] is not None:
        fields = parse_fields(opts["query_gpu"], GPU_FIELDS)
        rows = [(g, broken_value(fault, g["index"])) for g in gpus]
        return 0, (prefix + render_csv(rows, fields, GPU_FIELDS, with_header, with_units)).encode()
    fields = parse_fields(opts["query_apps"], APP_FIELDS)
    rows = app_rows(gpus, fault)
    return 0, (prefix + render_csv(rows, fields, APP_FIELDS, with_header, with_units)).encode()


def main(argv, state_dir=None):
    """Entry point of ``python3 -m ledger.sim nvidia-smi``: print like the real tool, return its code."""
    try:
        state_dir = sim_state.resolve_dir(state_dir)
        code, out = answer(state_dir, argv)
    except SmiExit as stop:
        code, out = stop.code, (stop.text + "\n").encode()
    except ValueError as error:
        # An uninitialised simulator looks, to callers, like a machine without a driver.
        sys.stderr.write("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                         "(ledger sim: %s)\n" % error)
        return 9
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return code
