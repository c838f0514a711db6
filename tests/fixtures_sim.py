"""Shared helpers for the GPU simulator tests: a throwaway simulated machine and its jobs.

Every process a test starts runs in its own session and is killed (by process group) at
teardown, so a failing assertion never leaves a fake job holding memory behind.
"""

import csv
import io
import os
import signal
import subprocess
import sys

import pytest

from ledger import sim
from conftest import wait_for  # noqa: F401  (re-exported for the test modules)

PYTHON = sys.executable




def kill_group(proc):
    """SIGKILL a process started with start_new_session=True, and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


class SimMachine:
    """A simulated machine in a tmp folder plus helpers to drive it like a user would."""

    def __init__(self, state_dir, spec, lag):
        self.state_dir = str(state_dir)
        self.spec = spec
        self.lag = lag
        sim.init_state(self.state_dir, spec, lag)
        self.bin_dir = sim.install_shim(self.state_dir)
        self.smi_path = os.path.join(self.bin_dir, "nvidia-smi")
        self.procs = []

    def env(self, gpus=None, **extra):
        """Environment for a job: the simulator's folder, the ledger package, visible GPUs."""
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["LEDGER_SIM_DIR"] = self.state_dir
        env["PYTHONPATH"] = sim.PACKAGE_ROOT
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        env.update(extra)
        return env

    def smi(self, *args, timeout=10):
        """Run the shim nvidia-smi (text mode)."""
        return subprocess.run([self.smi_path] + list(args), capture_output=True, text=True, timeout=timeout)

    def cli(self, *args, timeout=10):
        return subprocess.run([PYTHON, "-m", "ledger.sim"] + list(args) + ["--dir", self.state_dir],
                              capture_output=True, text=True, timeout=timeout, env=self.env())

    def csv_rows(self):
        """[(index, used, total)] through the shim, parsed as plain CSV."""
        out = self.smi("--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits")
        assert out.returncode == 0, out.stdout + out.stderr
        return [tuple(int(c) for c in row) for row in csv.reader(io.StringIO(out.stdout), skipinitialspace=True)]

    def used(self, index):
        return dict((i, u) for i, u, _t in self.csv_rows())[index]

    def app_pids(self):
        out = self.smi("--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits")
        assert out.returncode == 0, out.stdout + out.stderr
        return {int(row[1]): int(row[2]) for row in csv.reader(io.StringIO(out.stdout), skipinitialspace=True)}

    def used_now(self, index):
        """Memory use through the Python API (no subprocess: fast enough to beat the lag)."""
        return sim.snapshot(self.state_dir)[index]["used_mib"]

    def start_job(self, gpus, *args, cwd=None, env=None):
        """Start ``python3 -m ledger.sim job ARGS`` on the given CUDA_VISIBLE_DEVICES."""
        proc = subprocess.Popen([PYTHON, "-m", "ledger.sim", "job"] + [str(a) for a in args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env or self.env(gpus), cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run_job(self, gpus, *args, cwd=None, timeout=20):
        """Run a job to the end; returns (returncode, stdout, stderr)."""
        proc = self.start_job(gpus, *args, cwd=cwd)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def cleanup(self):
        for proc in self.procs:
            kill_group(proc)


@pytest.fixture
def make_sim(tmp_path):
    """Factory: make_sim(spec="2x80G", lag=0.5) -> SimMachine; its jobs die at teardown."""
    machines = []

    def make(spec="2x80G", lag=0.5, name="sim"):
        machine = SimMachine(tmp_path / name, spec, lag)
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        machine.cleanup()


@pytest.fixture
def machine(make_sim):
    """A 2x80G simulated machine with a 0.5 s release lag."""
    return make_sim()
