"""The GPU simulator, driven through real processes: the shim nvidia-smi and fake jobs."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from ledger import sim

try:
    from tests.fixtures_sim import PYTHON, kill_group, machine, make_sim, wait_for  # noqa: F401
except ImportError:
    from fixtures_sim import PYTHON, kill_group, machine, make_sim, wait_for  # noqa: F401

TORCH_OOM_RE = re.compile(
    r"^torch\.OutOfMemoryError: CUDA out of memory\. Tried to allocate (\d+\.\d\d (?:MiB|GiB))\. "
    r"GPU (\d+) has a total capacity of (\d+\.\d\d GiB) of which (\d+\.\d\d (?:MiB|GiB|KiB)|0 bytes) is free\. "
    r"Including non-PyTorch memory, this process has (\S+ \S+) memory in use\. Of the allocated memory "
)


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


# --- state, spec, shim ------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("4x80G", (4, 81920)), ("2x24G", (2, 24576)), ("1x40960M", (1, 40960)), ("8x80GiB", (8, 81920)),
])
def test_parse_spec_reads_count_and_size(spec, expected):
    assert sim.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "4x", "x80G", "4x80", "4*80G", "0x80G", "4x0G", "four"])
def test_parse_spec_rejects_bad_specs_with_an_example(spec):
    with pytest.raises(ValueError, match="expected NxSIZE like '4x80G'|between 1 and 64|must be positive"):
        sim.parse_spec(spec)


def test_init_is_idempotent_and_keeps_state_for_the_same_spec(tmp_path):
    state_dir = str(tmp_path / "s")
    sim.init_state(state_dir, "2x80G", 1.0)
    load_id = sim.add_load(state_dir, 1, 5000)
    sim.init_state(state_dir, "2x80G", 0.25)
    gpus = sim.snapshot(state_dir)
    assert [g["used_mib"] for g in gpus] == [0, 5000]
    assert gpus[1]["apps"][0]["id"] == load_id
    sim.init_state(state_dir, "4x24G", 0.25)
    gpus = sim.snapshot(state_dir)
    assert [(g["used_mib"], g["total_mib"]) for g in gpus] == [(0, 24576)] * 4


def test_uuids_are_deterministic_and_marked_as_simulated(tmp_path):
    sim.init_state(str(tmp_path / "a"), "2x80G", 0)
    sim.init_state(str(tmp_path / "b"), "2x80G", 0)
    uuids_a = [g["uuid"] for g in sim.snapshot(str(tmp_path / "a"))]
    uuids_b = [g["uuid"] for g in sim.snapshot(str(tmp_path / "b"))]
    assert uuids_a == uuids_b
    assert all(re.match(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-sim%d$" % i, u)
               for i, u in enumerate(uuids_a))


def test_cli_init_is_idempotent_and_writes_the_shim(tmp_path):
    state_dir = str(tmp_path / "cli")
    for _ in range(2):
        out = subprocess.run([PYTHON, "-m", "ledger.sim", "init", "--dir", state_dir, "--gpus", "4x80G", "--lag", "2"],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=sim.PACKAGE_ROOT))
        assert out.returncode == 0, out.stderr
    assert os.access(os.path.join(state_dir, "bin", "nvidia-smi"), os.X_OK)
    bad = subprocess.run([PYTHON, "-m", "ledger.sim", "init", "--dir", state_dir, "--gpus", "4x"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=sim.PACKAGE_ROOT))
    assert bad.returncode == 2
    assert "expected NxSIZE" in bad.stderr and "Traceback" not in bad.stderr


def test_shim_works_without_ledger_installed_or_env(machine, tmp_path):
    """The shim embeds the package folder and state dir: a bare environment still works."""
    out = subprocess.run([machine.smi_path, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0, 81920\n1, 81920\n"


def test_nvidia_smi_csv_with_header_and_units_like_the_real_tool(machine):
    sim.add_load(machine.state_dir, 1, 1234)
    out = machine.smi("--query-gpu=index,memory.used,memory.total", "--format=csv")
    assert out.returncode == 0
    assert out.stdout.splitlines() == [
        "index, memory.used [MiB], memory.total [MiB]",
        "0, 0 MiB, 81920 MiB",
        "1, 1234 MiB, 81920 MiB",
    ]
    out = machine.smi("--query-gpu", "memory.free,utilization.gpu,name,uuid", "--format=csv,nounits")
    lines = out.stdout.splitlines()
    assert lines[0] == "memory.free [MiB], utilization.gpu [%], name, uuid"
    assert lines[2].startswith("80686, 0, NVIDIA Sim GPU 80GB, GPU-")
    out = machine.smi("--query-gpu=index,utilization.gpu", "--format=csv,noheader", "-i", "1")
    assert out.stdout == "1, 0 %\n"


def test_nvidia_smi_rejects_unknown_fields_and_arguments(machine):
    out = machine.smi("--query-gpu=index,temperature.bogus", "--format=csv")
    assert out.returncode == 2 and 'Field "temperature.bogus" is not a valid field to query.' in out.stdout
    out = machine.smi("--bogus")
    assert out.returncode == 2 and "Invalid combination of input arguments" in out.stdout


def test_plain_nvidia_smi_prints_a_human_table(machine):
    sim.add_load(machine.state_dir, 0, 2048, name="other-user")
    out = machine.smi()
    assert out.returncode == 0
    assert "NVIDIA-SMI" in out.stdout and "2048MiB /  81920MiB" in out.stdout and "other-user" in out.stdout


# --- jobs -----------------------------------------------------------------------------------


def test_job_memory_is_visible_through_the_shim(machine):
    job = machine.start_job("1", "--mem", 30000, "--seconds", 20, "--ramp", 0.2)
    wait_for(lambda: machine.used(1) == 30000, what="job memory never showed on GPU 1")
    assert machine.used(0) == 0
    apps = machine.app_pids()
    assert apps[job.pid] == 30000
    out = machine.smi("--query-compute-apps=gpu_uuid,pid,process_name,used_gpu_memory", "--format=csv")
    assert out.stdout.splitlines()[0] == "gpu_uuid, pid, process_name, used_gpu_memory [MiB]"
    assert "%d, python, 30000 MiB" % job.pid in out.stdout
    assert job.poll() is None


def test_job_on_two_gpus_takes_memory_on_each(machine):
    machine.start_job("0,1", "--mem", 10000, "--seconds", 20, "--ramp", 0.1)
    wait_for(lambda: machine.csv_rows() == [(0, 10000, 81920), (1, 10000, 81920)])


def test_second_job_on_a_full_gpu_ooms_with_pytorch_text(machine):
    first = machine.start_job("0", "--mem", 60000, "--seconds", 20, "--ramp", 0.1)
    wait_for(lambda: machine.used_now(0) == 60000)
    code, out, err = machine.run_job("0", "--mem", 30000, "--seconds", 5, "--ramp", 0.1)
    assert code == 1
    assert "Traceback (most recent call last):" in err
    match = TORCH_OOM_RE.match(last_line(err))
    assert match, last_line(err)
    assert match.group(2) == "0" and match.group(3) == "80.00 GiB"
    assert first.poll() is None


def test_huge_alloc_reports_the_impossible_request(machine):
    code, out, err = machine.run_job("1", "--mem", 1000, "--alloc", 204800, "--seconds", 1, "--ramp", 0.05)
    assert code == 1
    line = last_line(err)
    assert line.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 200.00 GiB. "
                           "GPU 0 has a total capacity of 80.00 GiB of which ")
    assert "this process has 1000.00 MiB memory in use" in line


def test_job_without_visible_gpu_fails(machine):
    env = machine.env()
    proc = machine.start_job(None, "--mem", 10, "--seconds", 0, env=env)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "no GPU visible" in err


def test_job_writes_output_relative_to_cwd_and_exits_with_its_code(machine, tmp_path):
    code, out, err = machine.run_job("0", "--mem", 100, "--seconds", 0.1, "--ramp", 0.05, "--exit", 3,
                                     "--out", "results/deep/run.json", cwd=str(tmp_path))
    assert code == 3, err
    data = json.loads((tmp_path / "results" / "deep" / "run.json").read_text())
    assert data["args"]["mem"] == 100 and data["gpus"] == [0]
    assert "loss" in out


def test_memory_is_released_late_after_a_normal_exit(make_sim):
    machine = make_sim(lag=1.5)
    code, _out, err = machine.run_job("0", "--mem", 20000, "--seconds", 0.1, "--ramp", 0.05)
    exited = time.monotonic()
    assert code == 0, err
    assert machine.used_now(0) == 20000, "memory must still count right after the job exits"
    wait_for(lambda: machine.used_now(0) == 0, timeout=6)
    assert time.monotonic() - exited >= 1.2
    assert machine.app_pids() == {}


def test_released_but_lagging_memory_makes_the_next_job_oom(make_sim):
    """The wave-transition OOM: the GPU looks like it is being freed, but not yet."""
    machine = make_sim(lag=3.0)
    code, _out, _err = machine.run_job("0", "--mem", 70000, "--seconds", 0.05, "--ramp", 0.05)
    assert code == 0
    code, _out, err = machine.run_job("0", "--mem", 70000, "--seconds", 0.05, "--ramp", 0.05)
    assert code == 1 and TORCH_OOM_RE.match(last_line(err))


def test_sigkilled_job_is_noticed_dead_and_released_after_the_lag(make_sim):
    machine = make_sim(lag=1.0)
    job = machine.start_job("1", "--mem", 8000, "--seconds", 30, "--ramp", 0.05)
    wait_for(lambda: machine.used_now(1) == 8000)
    job.kill()
    job.wait(timeout=5)
    noticed = time.monotonic()
    assert machine.used_now(1) == 8000
    assert job.pid in machine.app_pids(), "a dead pid lingers in compute-apps until released"
    wait_for(lambda: machine.used_now(1) == 0, timeout=5)
    assert time.monotonic() - noticed >= 0.8


def test_sigterm_releases_memory_after_the_lag_and_dies_by_the_signal(make_sim):
    machine = make_sim(lag=1.0)
    job = machine.start_job("0", "--mem", 5000, "--seconds", 30, "--ramp", 0.05)
    wait_for(lambda: machine.used_now(0) == 5000)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=5) == -signal.SIGTERM
    assert machine.used_now(0) == 5000
    wait_for(lambda: machine.used_now(0) == 0, timeout=5)


def test_hang_after_output_writes_output_then_lingers_holding_memory(machine, tmp_path):
    out_path = tmp_path / "out.json"
    job = machine.start_job("0", "--mem", 4000, "--seconds", 0.1, "--ramp", 0.05, "--out", str(out_path),
                            "--hang-after-output")
    wait_for(lambda: out_path.exists(), what="output never written")
    assert json.loads(out_path.read_text())["args"]["hang_after_output"] is True
    wait_for(lambda: job.poll() is None and machine.used_now(0) == 4000, timeout=1)
    time.sleep(0.3)  # it must still be alive a while later: there is no event to poll for "did not exit"
    assert job.poll() is None and machine.used_now(0) == 4000
    kill_group(job)


def test_concurrent_jobs_never_overbook_a_gpu(machine):
    """Six jobs race for one GPU that fits four: the lock keeps the books straight."""
    jobs = [machine.start_job("0", "--mem", 20000, "--seconds", 1.0, "--ramp", 0.2) for _ in range(6)]
    peak = 0
    while any(j.poll() is None for j in jobs):
        used = machine.used_now(0)
        assert used <= 81920
        peak = max(peak, used)
        time.sleep(0.02)
    results = [(j.returncode, j.stderr.read()) for j in jobs]
    successes = [code for code, _ in results if code == 0]
    assert len(successes) <= 4
    assert all(TORCH_OOM_RE.match(last_line(err)) for code, err in results if code != 0)
    assert peak > 0


# --- foreign load and faults -----------------------------------------------------------------


def test_foreign_load_can_be_added_and_removed(machine):
    out = machine.cli("load", "--gpu", "1", "--mem", "7000", "--name", "jupyter")
    assert out.returncode == 0, out.stderr
    load_id = out.stdout.strip()
    second = sim.add_load(machine.state_dir, 1, 1000)
    assert machine.used(1) == 8000
    assert all(pid > 4194304 for pid in machine.app_pids())
    assert machine.cli("unload", "--id", load_id).returncode == 0
    assert machine.used(1) == 1000
    assert sim.remove_load(machine.state_dir, gpu=1) == 1
    assert machine.used(1) == 0
    bad = machine.cli("unload", "--id", second)
    assert bad.returncode == 2 and "no foreign load" in bad.stderr
    assert machine.cli("load", "--gpu", "5", "--mem", "1").returncode == 2


def test_fault_hang_makes_nvidia_smi_hang(machine):
    assert machine.cli("fault", "--mode", "hang").returncode == 0
    proc = subprocess.Popen([machine.smi_path, "--query-gpu=index", "--format=csv"], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    finally:
        kill_group(proc)


def test_fault_modes_break_nvidia_smi_like_real_drivers(machine):
    query = ("--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits")
    sim.set_fault(machine.state_dir, "not_found")
    out = machine.smi(*query)
    assert (out.returncode, out.stdout) == (6, "No devices were found\n")
    sim.set_fault(machine.state_dir, "mismatch")
    out = machine.smi(*query)
    assert out.returncode == 18
    assert out.stdout.splitlines()[0] == "Failed to initialize NVML: Driver/library version mismatch"
    sim.set_fault(machine.state_dir, "garbage")
    raw = subprocess.run([machine.smi_path] + list(query), capture_output=True)
    assert raw.returncode == 0 and b"GPU-" not in raw.stdout and raw.stdout
    sim.set_fault(machine.state_dir, "na", gpu=1)
    out = machine.smi(*query)
    assert out.stdout.splitlines()[1].endswith(", [N/A], [N/A]")
    assert out.stdout.splitlines()[0].endswith(", 0, 81920")
    sim.set_fault(machine.state_dir, "err", gpu=0)
    assert machine.smi(*query).stdout.splitlines()[0].endswith(", ERR!, ERR!")
    sim.set_fault(machine.state_dir, "warning")
    lines = machine.smi(*query).stdout.splitlines()
    assert lines[0].startswith("WARNING:") and lines[1].startswith("0, GPU-")
    assert machine.cli("fault", "--mode", "none").returncode == 0
    assert machine.csv_rows() == [(0, 0, 81920), (1, 0, 81920)]
    with pytest.raises(ValueError, match="fault mode 'melt'"):
        sim.set_fault(machine.state_dir, "melt")


def test_status_lists_gpus_and_allocations(machine):
    sim.add_load(machine.state_dir, 0, 321)
    out = machine.cli("status")
    assert out.returncode == 0
    assert "GPU 0" in out.stdout and "321 MiB" in out.stdout and "foreign" in out.stdout


def test_uninitialised_state_looks_like_a_missing_driver(tmp_path):
    out = subprocess.run([PYTHON, "-m", "ledger.sim", "nvidia-smi"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=sim.PACKAGE_ROOT, LEDGER_SIM_DIR=str(tmp_path / "none")))
    assert out.returncode == 9 and "couldn't communicate with the NVIDIA driver" in out.stderr
