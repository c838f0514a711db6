"""A GPU simulator for machines without GPUs: an nvidia-smi look-alike plus fake training jobs.

State lives in a folder (``LEDGER_SIM_DIR`` or ``--dir``); every process that touches it
takes an fcntl lock. ``python3 -m ledger.sim`` is the command line (init, nvidia-smi, job,
load, unload, fault, status); this module is the Python face used by ``ledger.gpus`` and
tests. Stdlib only: it runs on GPU hosts where only the bundle is present.
"""

import os
import shlex
import sys

from .state import (  # noqa: F401  (the public API)
    FAULT_MODES,
    add_load,
    gpu_uuid,
    init_state,
    parse_spec,
    remove_load,
    set_fault,
    snapshot,
)

__all__ = [
    "FAULT_MODES", "PACKAGE_ROOT", "add_load", "gpu_uuid", "init_state", "install_shim", "parse_spec",
    "remove_load", "set_fault", "snapshot",
]

#: The folder that holds the ``ledger`` package: what PYTHONPATH needs to import it.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIMS = {"nvidia-smi": "nvidia-smi", "ledger-sim": None}


def shim_text(state_dir, subcommand):
    """A /bin/sh script that runs the simulator with this state folder and this ledger package.

    It embeds absolute paths, so it works from any cwd and on hosts where ledger is not
    pip-installed, and it uses the interpreter that installed it.
    """
    python = sys.executable or "python3"
    args = "%s -m ledger.sim" % shlex.quote(python)
    if subcommand:
        args += " " + shlex.quote(subcommand)
    return (
        "#!/bin/sh\n"
        "# Written by ledger.sim.install_shim: the simulated %s for %s\n"
        "LEDGER_SIM_DIR=%s\n"
        "export LEDGER_SIM_DIR\n"
        "PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}\n"
        "export PYTHONPATH\n"
        'exec %s "$@"\n'
    ) % (subcommand or "ledger.sim", state_dir, shlex.quote(state_dir), shlex.quote(PACKAGE_ROOT), args)


def install_shim(state_dir):
    """Write ``<state_dir>/bin/nvidia-smi`` (and ``ledger-sim``) atomically; returns the bin folder."""
    state_dir = os.path.abspath(state_dir)
    bin_dir = os.path.join(state_dir, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for filename, subcommand in SHIMS.items():
        path = os.path.join(bin_dir, filename)
        text = shim_text(state_dir, subcommand)
        try:
            with open(path) as handle:
                if handle.read() == text and os.access(path, os.X_OK):
                    continue
        except OSError:
            pass
        tmp = "%s.tmp-%d" % (path, os.getpid())
        with open(tmp, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return bin_dir
