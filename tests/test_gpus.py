"""GPU providers: the nvidia-smi parser, the subprocess guard, the simulator provider."""

import os
import subprocess
import time

import pytest

from ledger import sim
from ledger.errors import LedgerError
from ledger.gpus import (
    App,
    GpuInfo,
    GpuSnapshot,
    NvidiaSmiProvider,
    SimProvider,
    compose_job_env,
    parse_apps_query,
    parse_gpu_query,
    provider_from_spec,
)

try:
    from tests.fixtures_sim import PYTHON, kill_group, wait_for
except ImportError:
    from fixtures_sim import PYTHON, kill_group, wait_for

UUID0 = "GPU-5f1c2a3b-1111-2222-3333-444455556666"
UUID1 = "GPU-9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff"


# --- parse_gpu_query -----------------------------------------------------------------------


def test_parse_plain_nounits_output():
    gpus, problems = parse_gpu_query("0, %s, 1234, 81920\n1, %s, 0, 81920\n" % (UUID0, UUID1))
    assert problems == []
    assert gpus == {0: GpuInfo(0, UUID0, 1234, 81920, None), 1: GpuInfo(1, UUID1, 0, 81920, None)}


def test_parse_output_with_header_and_units():
    text = ("index, uuid, memory.used [MiB], memory.total [MiB]\n"
            "0, %s, 40531 MiB, 81559 MiB\n" % UUID0)
    gpus, problems = parse_gpu_query(text)
    assert problems == [] and gpus[0].used_mib == 40531 and gpus[0].total_mib == 81559


@pytest.mark.parametrize("value", ["[N/A]", "[Not Supported]", "ERR!", "[Unknown Error]", "[GPU requires reset]"])
def test_unreadable_memory_sets_error_never_a_guess(value):
    gpus, problems = parse_gpu_query("0, %s, %s, 81920\n1, %s, 10, 81920\n" % (UUID0, value, UUID1))
    assert gpus[0].used_mib is None and gpus[0].total_mib is None
    assert value in gpus[0].error
    assert gpus[1] == GpuInfo(1, UUID1, 10, 81920, None)
    snapshot = GpuSnapshot(gpus, (), None)
    assert not snapshot.readable(0) and snapshot.readable(1)


def test_warning_lines_are_reported_and_skipped():
    text = ("WARNING: infoROM is corrupted at gpu 0000:3B:00.0\n"
            "0, %s, 5, 24576\n" % UUID0)
    gpus, problems = parse_gpu_query(text)
    assert list(gpus) == [0] and gpus[0].used_mib == 5
    assert len(problems) == 1 and "infoROM is corrupted" in problems[0]


def test_garbage_yields_problems_and_no_gpus():
    gpus, problems = parse_gpu_query("x\x00\ufffd,,\n%%%junk, 12\n\n1,2,3,4\n")
    assert gpus == {}
    assert len(problems) == 3


@pytest.mark.parametrize("text", [
    "No devices were found\n",
    "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.113\n",
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
    "latest NVIDIA driver is installed and running.\n",
])
def test_fatal_messages_are_problems(text):
    gpus, problems = parse_gpu_query(text)
    assert gpus == {} and problems and problems[0] == text.splitlines()[0]


def test_used_above_total_and_duplicates_are_errors():
    gpus, problems = parse_gpu_query("0, %s, 90000, 81920\n1, %s, 1, 2\n1, %s, 1, 2\n" % (UUID0, UUID1, UUID1))
    assert "exceeds" in gpus[0].error
    assert gpus[1].error and "GPU 1 listed twice" in problems


def test_parse_apps_query_with_and_without_units():
    text = ("gpu_uuid, pid, used_gpu_memory [MiB]\n"
            "%s, 4242, 30000 MiB\n"
            "%s, 777, [N/A]\n"
            "garbage line\n" % (UUID0, UUID1))
    apps, problems = parse_apps_query(text)
    assert apps == (App(UUID0, 4242, 30000), App(UUID1, 777, None))
    assert problems == ["unexpected line: garbage line"]
    assert parse_apps_query("") == ((), [])


# --- NvidiaSmiProvider against fake binaries ------------------------------------------------


def fake_binary(tmp_path, body, name="nvidia-smi"):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


GOOD_SCRIPT = """
case "$1" in
  --query-gpu=index,uuid,memory.used,memory.total)
    printf '0, %s, 100, 81920\\n1, %s, 70000, 81920\\n' ;;
  --query-compute-apps=gpu_uuid,pid,used_memory)
    printf '%s, 31337, 70000\\n' ;;
  *) echo "unexpected args: $*"; exit 2 ;;
esac
""" % (UUID0, UUID1, UUID1)


def test_provider_reads_gpus_and_apps_from_a_working_binary(tmp_path):
    snapshot = NvidiaSmiProvider(binary=fake_binary(tmp_path, GOOD_SCRIPT)).read()
    assert snapshot.error is None
    assert snapshot.gpus[1] == GpuInfo(1, UUID1, 70000, 81920, None)
    assert snapshot.apps == (App(UUID1, 31337, 70000),)
    assert snapshot.apps_on(1) == snapshot.apps and snapshot.apps_on(0) == ()


def test_provider_times_out_a_hanging_binary_and_kills_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    binary = fake_binary(tmp_path, "sleep 30 &\necho $! > %s\nwait\n" % pid_file)
    started = time.monotonic()
    snapshot = NvidiaSmiProvider(binary=binary, timeout=1.0).read()
    assert time.monotonic() - started <= 2.0
    assert snapshot.error == "nvidia-smi timed out after 1 s"
    child = int(pid_file.read_text())
    wait_for(lambda: not os.path.exists("/proc/%d" % child) or
             open("/proc/%d/stat" % child).read().split(") ")[1][0] == "Z", timeout=2,
             what="the hung binary's child survived")


def test_provider_reports_a_missing_binary(tmp_path):
    snapshot = NvidiaSmiProvider(binary="nvidia-smi-not-installed-here").read()
    assert snapshot.error == "nvidia-smi-not-installed-here not found on PATH"
    assert snapshot.gpus == {}
    missing = str(tmp_path / "nowhere" / "nvidia-smi")
    assert NvidiaSmiProvider(binary=missing).read().error == "nvidia-smi not found at %s" % missing


def test_provider_reports_a_binary_that_is_not_executable(tmp_path):
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n")
    assert "is not executable" in NvidiaSmiProvider(binary=str(path)).read().error


def test_provider_reports_driver_mismatch_in_one_line(tmp_path):
    binary = fake_binary(tmp_path, "echo 'Failed to initialize NVML: Driver/library version mismatch'\n"
                                   "echo 'NVML library version: 535.113'\nexit 18\n")
    assert NvidiaSmiProvider(binary=binary).read().error == (
        "nvidia-smi: Failed to initialize NVML: Driver/library version mismatch")


def test_provider_reports_other_non_zero_exits(tmp_path):
    binary = fake_binary(tmp_path, "echo 'Unknown Error' >&2\nexit 3\n")
    assert NvidiaSmiProvider(binary=binary).read().error == "nvidia-smi exited with code 3: Unknown Error"
    binary = fake_binary(tmp_path, "exit 4\n", name="silent")
    assert NvidiaSmiProvider(binary=binary).read().error == "silent exited with code 4"


def test_provider_reports_garbage_on_exit_zero(tmp_path):
    binary = fake_binary(tmp_path, "printf 'zz\\377\\376 garbage\\000\\n'\n")
    snapshot = NvidiaSmiProvider(binary=binary).read()
    assert snapshot.error.startswith("nvidia-smi: unreadable output: unexpected line: zz")
    assert "\n" not in snapshot.error


def test_provider_passes_extra_env(tmp_path):
    binary = fake_binary(tmp_path, 'printf "0, %s, $FAKE_USED, 81920\\n"\n' % UUID0)
    snapshot = NvidiaSmiProvider(binary=binary, env={"FAKE_USED": "42"}).read()
    assert snapshot.gpus[0].used_mib == 42
    assert NvidiaSmiProvider().job_env() == {} and NvidiaSmiProvider().name == "nvidia-smi"


# --- SimProvider ---------------------------------------------------------------------------


def test_sim_provider_reads_the_simulator_end_to_end(tmp_path):
    provider = SimProvider(str(tmp_path / "sim"), "2x24G", lag=0.2)
    assert provider.name == "sim:2x24G"
    snapshot = provider.read()
    assert snapshot.error is None
    assert [(g.index, g.used_mib, g.total_mib) for g in snapshot.gpus.values()] == [(0, 0, 24576), (1, 0, 24576)]
    sim.add_load(provider.state_dir, 1, 3000)
    sim.set_fault(provider.state_dir, "na", gpu=0)
    snapshot = provider.read()
    assert not snapshot.readable(0) and snapshot.gpus[1].used_mib == 3000
    assert snapshot.apps[0].used_mib == 3000
    sim.set_fault(provider.state_dir, "mismatch")
    assert provider.read().error == "nvidia-smi: Failed to initialize NVML: Driver/library version mismatch"


def test_sim_provider_job_env_runs_sim_jobs_and_nvidia_smi(tmp_path):
    provider = SimProvider(str(tmp_path / "sim"), "1x80G", lag=0.2)
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0"}
    env = compose_job_env(base, provider)
    assert env["LEDGER_SIM_DIR"] == provider.state_dir
    assert env["PATH"] == provider.bin_dir + os.pathsep + "/usr/bin:/bin"
    assert env["PYTHONPATH"] == sim.PACKAGE_ROOT
    listed = subprocess.run(["/bin/sh", "-c", "nvidia-smi -L"], env=env, capture_output=True, text=True)
    assert listed.stdout.startswith("GPU 0: NVIDIA Sim GPU 80GB (UUID: GPU-"), listed.stderr
    proc = subprocess.Popen(["/bin/sh", "-c", "exec %s -m ledger.sim job --mem 12000 --seconds 20 --ramp 0.05" % PYTHON],
                            env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: provider.read().gpus[0].used_mib == 12000)
        assert provider.read().apps[0].pid == proc.pid
    finally:
        kill_group(proc)


def test_sim_provider_hang_fault_times_out(tmp_path):
    provider = SimProvider(str(tmp_path / "sim"), "1x80G", lag=0.2, timeout=1.0)
    sim.set_fault(provider.state_dir, "hang")
    started = time.monotonic()
    assert provider.read().error == "nvidia-smi timed out after 1 s"
    assert time.monotonic() - started <= 2.0


# --- provider_from_spec ---------------------------------------------------------------------


def test_provider_from_spec_picks_the_provider(tmp_path):
    assert isinstance(provider_from_spec(None, str(tmp_path)), NvidiaSmiProvider)
    assert provider_from_spec("nvidia-smi", str(tmp_path)).name == "nvidia-smi"
    provider = provider_from_spec("sim:2x80G,lag=1.5", str(tmp_path))
    assert isinstance(provider, SimProvider)
    assert provider.name == "sim:2x80G" and provider.lag == 1.5
    assert provider.state_dir == str(tmp_path / "sim")
    assert provider_from_spec("sim:4x80G", str(tmp_path)).lag == 2.0
    assert provider_from_spec("sim:4x80G", str(tmp_path)).timeout == 10.0
    assert provider_from_spec("sim:4x80G,lag=0,timeout=2", str(tmp_path)).timeout == 2.0


@pytest.mark.parametrize("spec, message", [
    ("xyz", "gpu_provider 'xyz': expected 'nvidia-smi' or 'sim:NxSIZE' like 'sim:4x80G'"),
    ("sim:4x", "gpu_provider 'sim:4x': GPU spec '4x': expected NxSIZE like '4x80G'"),
    ("sim:4x80G,lag=soon", "lag must be a number of seconds >= 0, got 'soon'"),
    ("sim:4x80G,lag=-1", "lag must be a number of seconds >= 0"),
    ("sim:4x80G,speed=9", "unknown option 'speed=9'"),
    ("sim:4x80G,timeout=0", "timeout must be a number of seconds > 0, got '0'"),
])
def test_provider_from_spec_rejects_bad_specs(tmp_path, spec, message):
    with pytest.raises(LedgerError) as caught:
        provider_from_spec(spec, str(tmp_path))
    assert message in str(caught.value)
    assert not (tmp_path / "sim").exists()
