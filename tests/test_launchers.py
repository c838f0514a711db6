"""Launchers and the attempt wrapper, against real screen, tmux, processes and signals.

Screen and tmux run on private socket folders (SCREENDIR, ``tmux -S``) so the tests
never see or wipe a user's own sessions; every test's run id is unique as well.
"""

import os
import shutil
import signal
import tempfile
import uuid

import pytest

from fixtures_conda import make_fake_conda
from ledger import launchers
from ledger.errors import LaunchError
from ledger.launchers import (
    LaunchRequest,
    ProcessLauncher,
    ScreenLauncher,
    TmuxLauncher,
    control_paths,
    get_launcher,
    kill_group,
    process_alive,
    read_exit,
    read_pid,
    resolve_conda_hook,
    session_name,
    write_wrapper,
)
from conftest import wait_for

PWNED = "pwned"




def pgid_of(pid):
    return os.getpgid(pid)


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as fh:
        data = fh.read()
    return int(data[data.rfind(")") + 2:].split()[1])


def cmdline_of(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")


def no_pwned_anywhere(*roots):
    for root in roots:
        for _dir, _dirs, files in os.walk(str(root)):
            assert PWNED not in files, "an injected command ran"
    return True


# --------------------------------------------------------------------------- fixtures


class Host:
    """One test's job host: a run id, a control folder, a cwd, and launch helpers."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.run = "t" + uuid.uuid4().hex[:10]
        self.control = str(tmp_path / "control" / self.run)
        self.cwd = tmp_path / "work"
        (self.cwd / "sub").mkdir(parents=True)

    def request(self, cmd, job="j", attempt=1, **overrides):
        fields = dict(
            run=self.run, job=job, attempt=attempt, cmd=cmd, cwd=str(self.cwd), gpus=(3,),
            env={}, conda_env=None, conda_hook=None, control_dir=self.control,
            log_path=str(self.cwd / "experiment_queue" / self.run / "logs" / ("%s.%d.log" % (job, attempt))),
        )
        fields.update(overrides)
        return LaunchRequest(**fields)

    def launch(self, launcher, req):
        files = write_wrapper(req)
        launcher.start(session_name(req.run, req.job, req.attempt), files, req.cwd)
        return files

    def run_to_end(self, launcher, req, timeout=10.0):
        files = self.launch(launcher, req)
        return files, wait_for(lambda: read_exit(files), timeout, what="exit file of %s" % req.job)

    def kill_leftover_jobs(self):
        """SIGKILL every job group whose pid file is in this test's control folder."""
        if not os.path.isdir(self.control):
            return
        for name in os.listdir(self.control):
            if name.endswith(".pid"):
                with open(os.path.join(self.control, name)) as fh:
                    text = fh.read().strip()
                if text.isdigit():
                    try:
                        os.killpg(int(text), signal.SIGKILL)
                    except OSError:
                        pass


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.kill_leftover_jobs()


@pytest.fixture
def screen():
    """A ScreenLauncher on a private SCREENDIR; every session it left is quit and wiped."""
    folder = tempfile.mkdtemp(prefix="lsc", dir="/tmp")
    os.chmod(folder, 0o700)
    launcher = ScreenLauncher(screendir=folder)
    yield launcher
    for pid, _name, _dead in launcher.entries():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    launcher.wipe()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tmux():
    """A TmuxLauncher on a private server socket, killed afterwards."""
    folder = tempfile.mkdtemp(prefix="ltm", dir="/tmp")
    launcher = TmuxLauncher(socket=os.path.join(folder, "sock"))
    yield launcher
    launcher.kill_server()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def process():
    launcher = ProcessLauncher()
    yield launcher
    for session in launcher.sessions(""):
        launcher.kill(session)


@pytest.fixture(params=["screen", "tmux", "process"])
def any_launcher(request):
    """Each launcher in turn, for the behaviour all of them must share."""
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- exit codes, logs, pids


def test_exit_code_3_is_recorded_exactly(host, any_launcher):
    _files, ex = host.run_to_end(any_launcher, host.request("echo before; exit 3"))
    assert ex["exit_code"] == 3
    assert ex["signal"] is None
    assert ex["reason"] is None
    assert ex["started_at"] <= ex["ended_at"]


def test_success_exit_0_and_log_has_output(host, any_launcher):
    req = host.request("echo hi; echo err >&2; exit 0")
    _files, ex = host.run_to_end(any_launcher, req)
    assert ex["exit_code"] == 0 and ex["signal"] is None
    with open(req.log_path) as fh:
        assert fh.read() == "hi\nerr\n"


def test_pid_file_holds_the_jobs_own_pid_not_the_wrappers(host, any_launcher):
    files = host.launch(any_launcher, host.request("sleep 30"))
    pid = wait_for(lambda: read_pid(files), what="pid file")
    assert pgid_of(pid) == pid, "the job leads its own process group"
    assert "sleep 30" in cmdline_of(pid)
    wrapper = parent_of(pid)
    assert wrapper != pid and files.script in cmdline_of(wrapper)
    os.killpg(pid, signal.SIGKILL)
    ex = wait_for(lambda: read_exit(files), what="exit file")
    assert ex["pid"] == pid and ex["wrapper_pid"] == wrapper


def test_sigkilled_job_is_recorded_with_signal_9(host, process):
    files = host.launch(process, host.request("sleep 30"))
    pid = wait_for(lambda: read_pid(files), what="pid file")
    os.kill(pid, signal.SIGKILL)
    ex = wait_for(lambda: read_exit(files), what="exit file")
    assert ex["signal"] == 9 and ex["exit_code"] is None


def test_exit_137_is_told_apart_from_sigkill(host, screen):
    _f, by_exit = host.run_to_end(screen, host.request("exit 137", job="byexit"))
    _f, by_kill = host.run_to_end(screen, host.request("kill -KILL $$", job="bykill"))
    assert (by_exit["exit_code"], by_exit["signal"]) == (137, None)
    assert (by_kill["exit_code"], by_kill["signal"]) == (None, 9)


def test_read_exit_is_none_while_the_job_runs(host, process):
    files = host.launch(process, host.request("sleep 30"))
    pid = wait_for(lambda: read_pid(files), what="pid file")
    assert read_exit(files) is None
    os.killpg(pid, signal.SIGKILL)


def test_second_attempt_writes_its_own_log(host, screen):
    first = host.request("echo one", attempt=1)
    second = host.request("echo two", attempt=2)
    host.run_to_end(screen, first)
    host.run_to_end(screen, second)
    assert first.log_path != second.log_path
    with open(first.log_path) as fh:
        assert fh.read() == "one\n"
    with open(second.log_path) as fh:
        assert fh.read() == "two\n"
    assert control_paths(host.control, "j", 1).exit != control_paths(host.control, "j", 2).exit


# --------------------------------------------------------------------------- environment and quoting


def test_cuda_and_ledger_env_reach_a_cd_and_command(host, screen):
    req = host.request("cd sub && env > env.txt && echo \"gpu=${GPU} run=${RUN_ID} attempt=${ATTEMPT}\"",
                       gpus=(0, 1), attempt=2, path_prefix=(str(host.tmp / "simbin"),),
                       pythonpath_prefix=(str(host.tmp / "simpy"),), extra_env={"LEDGER_SIM_DIR": "/sim"})
    _files, ex = host.run_to_end(screen, req)
    assert ex["exit_code"] == 0
    env = dict(line.split("=", 1) for line in (host.cwd / "sub" / "env.txt").read_text().splitlines() if "=" in line)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert (env["LEDGER_RUN"], env["LEDGER_JOB"], env["LEDGER_ATTEMPT"]) == (host.run, "j", "2")
    assert env["LEDGER_SIM_DIR"] == "/sim"
    assert env["PATH"].startswith(str(host.tmp / "simbin") + ":")
    assert env["PYTHONPATH"].split(":")[0] == str(host.tmp / "simpy")
    with open(req.log_path) as fh:
        assert fh.read() == "gpu=0,1 run=%s attempt=2\n" % host.run


HOSTILE = [
    "it's \"quoted\"",
    "$(touch pwned)",
    "`touch pwned`",
    "a; touch pwned",
    "two  spaces\nand a newline",
    "ünïcødé ✓ $HOME \\n",
]


def test_env_values_arrive_byte_exact_and_never_run(host, process):
    env = {"V%d" % i: value for i, value in enumerate(HOSTILE)}
    dump = "; ".join("printf '%%s' \"$V%d\" > v%d.out" % (i, i) for i in range(len(HOSTILE)))
    _files, ex = host.run_to_end(process, host.request(dump, env=env, extra_env={"X": "$(touch pwned)"}))
    assert ex["exit_code"] == 0
    for i, value in enumerate(HOSTILE):
        assert (host.cwd / ("v%d.out" % i)).read_bytes() == value.encode("utf-8")
    no_pwned_anywhere(host.tmp)


def test_hostile_cwd_job_id_and_paths_never_run(host, screen):
    weird = host.tmp / "w $(touch pwned) `touch pwned` ; touch pwned 'q\""
    (weird / "sub").mkdir(parents=True)
    job = "job$(touch pwned);touch pwned`touch pwned`"
    req = host.request("pwd > where.txt", job=job, cwd=str(weird),
                       log_path=str(weird / "experiment_queue" / "logs" / "x;touch pwned.log"),
                       path_prefix=("/nowhere/$(touch pwned)",), conda_env=None)
    files, ex = host.run_to_end(screen, req)
    assert ex["exit_code"] == 0
    assert (weird / "where.txt").read_text() == str(weird) + "\n"
    assert os.path.basename(files.script) == job + ".1.sh"
    no_pwned_anywhere(host.tmp)
    assert not os.path.exists(os.path.join(os.getcwd(), PWNED))


def test_cmd_text_is_passed_byte_exact_to_bash(host, process):
    cmd = "printf '%s|' \"it's\" \"$(echo sub)\" `echo bt` ; echo\necho 'ünï ✓'; echo \"${RUN_ID}\""
    req = host.request(cmd)
    _files, ex = host.run_to_end(process, req)
    assert ex["exit_code"] == 0
    with open(req.log_path, encoding="utf-8") as fh:
        assert fh.read() == "it's|sub|bt|\nünï ✓\n%s\n" % host.run


def test_missing_cwd_is_reported_and_not_created(host, process):
    missing = host.tmp / "gone"
    req = host.request("touch ran", cwd=str(missing), log_path=str(missing / "experiment_queue" / "l.log"))
    _files, ex = host.run_to_end(process, req)
    assert ex["reason"] == "cwd not found: %s" % missing
    assert ex["exit_code"] is None and ex["signal"] is None
    assert not missing.exists()


def test_tilde_cwd_is_expanded_on_the_host(host, process, monkeypatch):
    monkeypatch.setenv("HOME", str(host.tmp))
    req = host.request("pwd", cwd="~/work", log_path="~/work/l.log")
    _files, ex = host.run_to_end(process, req)
    assert ex["exit_code"] == 0
    assert (host.cwd / "l.log").read_text() == str(host.cwd) + "\n"


def test_bad_env_name_is_refused(host):
    with pytest.raises(LaunchError, match="not a valid shell variable name"):
        write_wrapper(host.request("true", env={"A B": "x"}))


def test_wrapper_internal_names_are_refused_as_env(host):
    with pytest.raises(LaunchError, match="reserved"):
        write_wrapper(host.request("true", env={"_lw_cmd": "touch pwned"}))


def test_job_env_cannot_redirect_the_shell_that_runs_the_job(host, process):
    _files, ex = host.run_to_end(process, host.request("echo ok", env={"BASH": "/nonexistent/bash"}))
    assert ex["exit_code"] == 0


def test_control_dir_and_script_are_private(host):
    files = write_wrapper(host.request("true"))
    assert os.stat(files.control_dir).st_mode & 0o777 == 0o700
    assert os.stat(files.script).st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- session names


def test_session_name_plain_form():
    assert session_name("r1", "train-lr_0", 2) == "ledger.r1.train-lr_0.a2"


@pytest.mark.parametrize("run,job", [
    ("r1", "a.b"), ("r1", "a b"), ("r1", "$(touch pwned)"), ("r" * 200, "j" * 200), ("ü", "ä"),
])
def test_session_names_are_safe_and_short(run, job):
    name = session_name(run, job, 12)
    assert launchers._SESSION_OK.fullmatch(name)
    assert len(name) <= 80 and name.startswith("ledger.")


def test_session_names_are_unique():
    triples = [("a", "b.c", 1), ("a.b", "c", 1), ("a", "b_c", 1), ("a", "b c", 1), ("a", "b/c", 1),
               ("a", "bc", 1), ("a", "bc", 2), ("x" * 100, "y", 1), ("x" * 100 + "z", "y", 1)]
    names = [session_name(*t) for t in triples]
    assert len(set(names)) == len(names)
    assert session_name("a", "b.c", 1) == session_name("a", "b.c", 1)


# --------------------------------------------------------------------------- screen


def test_screen_sessions_alive_and_kill_take_the_whole_group_down(host, screen):
    req = host.request("sleep 300 & echo $! > child.pid; wait")
    files = host.launch(screen, req)
    session = session_name(req.run, req.job, req.attempt)
    pid = wait_for(lambda: read_pid(files), what="pid file")
    child_file = host.cwd / "child.pid"
    child = int(wait_for(lambda: child_file.exists() and child_file.read_text().strip(), what="child pid"))
    assert session in screen.sessions() and screen.alive(session)
    assert session in screen.sessions("ledger.%s." % host.run)
    assert session not in screen.sessions("ledger.other.")

    screen.kill(session)
    wait_for(lambda: not screen.alive(session), what="session gone")
    wait_for(lambda: not process_alive(pid) and not process_alive(child), what="job and child gone")
    ex = wait_for(lambda: read_exit(files), what="exit file")
    assert ex["signal"] == signal.SIGHUP and ex["reason"] == "wrapper received SIGHUP"
    screen.kill(session)  # idempotent


def test_dead_screen_is_reported_not_live_and_wiped(host, screen):
    req = host.request("sleep 300")
    files = host.launch(screen, req)
    session = session_name(req.run, req.job, req.attempt)
    wait_for(lambda: read_pid(files), what="pid file")
    server = [pid for pid, name, _dead in screen.entries() if name == session][0]
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: session in screen.listing().dead, what="screen reported dead")
    assert session not in screen.sessions() and not screen.alive(session)
    screen.wipe()
    assert session not in screen.listing().dead
    wait_for(lambda: read_exit(files), what="job stopped after its terminal hung up")


def test_screen_refuses_a_duplicate_session(host, screen):
    req = host.request("sleep 300")
    files = host.launch(screen, req)
    with pytest.raises(LaunchError, match="already running"):
        screen.start(session_name(req.run, req.job, req.attempt), files, req.cwd)


def test_missing_screen_binary_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError) as err:
        get_launcher("screen")
    assert str(err.value) == ("screen is not installed on this host (launcher: screen); "
                              "install it or set launcher: process")
    with pytest.raises(LaunchError, match="tmux is not installed"):
        get_launcher("tmux")
    assert get_launcher("process").name == "process"


def test_unknown_launcher_is_a_launch_error():
    with pytest.raises(LaunchError, match="unknown launcher"):
        get_launcher("slurmish")


# --------------------------------------------------------------------------- tmux


def test_tmux_sessions_alive_and_kill(host, tmux):
    req = host.request("sleep 300 & echo $! > child.pid; wait", job="a.b")
    files = host.launch(tmux, req)
    session = session_name(req.run, req.job, req.attempt)
    pid = wait_for(lambda: read_pid(files), what="pid file")
    child_file = host.cwd / "child.pid"
    child = int(wait_for(lambda: child_file.exists() and child_file.read_text().strip(), what="child pid"))
    assert session in tmux.sessions() and tmux.alive(session)
    tmux.kill(session)
    wait_for(lambda: not tmux.alive(session), what="session gone")
    wait_for(lambda: not process_alive(pid) and not process_alive(child), what="job and child gone")
    assert wait_for(lambda: read_exit(files), what="exit file")["signal"] == signal.SIGHUP
    tmux.kill(session)  # idempotent
    assert tmux.sessions() == set()


# --------------------------------------------------------------------------- process launcher


def test_process_sessions_alive_kill_and_rediscovery(host, process):
    req = host.request("sleep 300 & echo $! > child.pid; wait")
    files = host.launch(process, req)
    session = session_name(req.run, req.job, req.attempt)
    pid = wait_for(lambda: read_pid(files), what="pid file")
    child_file = host.cwd / "child.pid"
    child = int(wait_for(lambda: child_file.exists() and child_file.read_text().strip(), what="child pid"))
    assert process.alive(session) and session in process.sessions()

    fresh = ProcessLauncher(control_dirs=[host.control])  # as after a scheduler restart
    assert session in fresh.sessions()
    assert ProcessLauncher().sessions() == set()

    fresh.kill(session)
    wait_for(lambda: not process.alive(session), what="wrapper gone")
    wait_for(lambda: not process_alive(pid) and not process_alive(child), what="job and child gone")
    assert wait_for(lambda: read_exit(files), what="exit file")["signal"] == signal.SIGTERM
    fresh.kill(session)  # idempotent


def test_wrapper_escalates_to_sigkill_after_grace(host, process):
    req = host.request("trap '' TERM HUP; sleep 300", kill_grace=0.3)
    files = host.launch(process, req)
    wait_for(lambda: read_pid(files), what="pid file")
    process.kill(session_name(req.run, req.job, req.attempt))
    ex = wait_for(lambda: read_exit(files), timeout=5, what="exit file")
    assert ex["signal"] == 9 and ex["reason"] == "wrapper received SIGTERM"


def test_kill_group_terms_then_kills(host, process):
    files = host.launch(process, host.request("trap '' TERM; sleep 300 & wait"))
    pid = wait_for(lambda: read_pid(files), what="pid file")
    wait_for(lambda: len(launchers.group_members(pid)) >= 2, what="job's child started")
    kill_group(pid, grace=0.3)
    assert launchers.group_members(pid) == []
    assert wait_for(lambda: read_exit(files), what="exit file")["signal"] == 9
    kill_group(pid)  # a gone group is fine


# --------------------------------------------------------------------------- conda


@pytest.fixture
def no_conda_env(tmp_path, monkeypatch):
    """HOME without any conda install, no LEDGER_CONDA_HOOK, a PATH without conda."""
    home = tmp_path / "home"
    home.mkdir()
    path = "/usr/local/bin:/usr/bin:/bin"
    if shutil.which("conda", path=path) or any(os.path.exists(p) for p in launchers.CONDA_CANDIDATES if p.startswith("/")):
        pytest.skip("this host has a real conda in a system location")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("LEDGER_CONDA_HOOK", raising=False)
    return home


def _marker_cmd():
    return "touch ran; echo \"env=$CONDA_DEFAULT_ENV\""


def test_conda_env_is_activated_with_a_manifest_conda_path(host, process, no_conda_env):
    conda = make_fake_conda(host.tmp / "conda")
    req = host.request(_marker_cmd(), conda_env="torch", conda_hook=conda.binary)
    _files, ex = host.run_to_end(process, req)
    assert ex["exit_code"] == 0
    with open(req.log_path) as fh:
        assert fh.read() == "env=torch\n"


def test_conda_manifest_hook_as_shell_text(host, process, no_conda_env):
    conda = make_fake_conda(host.tmp / "conda")
    hook = 'eval "$(%s shell.bash hook)"' % conda.binary
    req = host.request(_marker_cmd(), conda_env="torch", conda_hook=hook)
    _files, ex = host.run_to_end(process, req)
    assert ex["exit_code"] == 0 and (host.cwd / "ran").exists()


def test_conda_found_through_env_var_and_home_install(host, process, no_conda_env, monkeypatch):
    conda = make_fake_conda(host.tmp / "conda")
    monkeypatch.setenv("LEDGER_CONDA_HOOK", conda.binary)
    _f, ex = host.run_to_end(process, host.request(_marker_cmd(), job="viaenv", conda_env="torch"))
    assert ex["exit_code"] == 0
    monkeypatch.delenv("LEDGER_CONDA_HOOK")
    make_fake_conda(no_conda_env / "miniforge3")
    _f, ex = host.run_to_end(process, host.request(_marker_cmd(), job="viahome", conda_env="torch"))
    assert ex["exit_code"] == 0


def test_unknown_conda_env_fails_before_the_job_runs(host, process, no_conda_env):
    conda = make_fake_conda(host.tmp / "conda")
    req = host.request(_marker_cmd(), conda_env="nope", conda_hook=conda.binary)
    files, ex = host.run_to_end(process, req)
    reason = "conda activation failed: EnvironmentNameNotFound: Could not find conda environment: nope"
    assert ex["reason"] == reason and ex["exit_code"] is None
    assert not (host.cwd / "ran").exists() and read_pid(files) is None
    with open(req.log_path) as fh:
        assert fh.read().rstrip().endswith("ledger: " + reason)


def test_uninitialised_conda_hook_fails_with_condas_reason(host, screen, no_conda_env):
    conda = make_fake_conda(host.tmp / "conda", hook_works=False)
    req = host.request(_marker_cmd(), conda_env="torch", conda_hook=conda.binary)
    files, ex = host.run_to_end(screen, req)
    assert ex["reason"] == "conda activation failed: CondaError: Run 'conda init' before 'conda activate'"
    assert not (host.cwd / "ran").exists() and read_pid(files) is None


def test_no_conda_at_all_fails_with_command_not_found(host, process, no_conda_env):
    files, ex = host.run_to_end(process, host.request(_marker_cmd(), conda_env="torch"))
    assert ex["reason"] == "conda activation failed: conda: command not found"
    assert not (host.cwd / "ran").exists()


def test_hostile_conda_env_name_is_only_data(host, process, no_conda_env):
    conda = make_fake_conda(host.tmp / "conda")
    _f, ex = host.run_to_end(process, host.request("true", conda_env="x$(touch pwned)", conda_hook=conda.binary))
    assert ex["reason"].startswith("conda activation failed: EnvironmentNameNotFound")
    no_pwned_anywhere(host.tmp)


def test_resolve_conda_hook_search_order(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env_conda = make_fake_conda(tmp_path / "viaenv")
    path_conda = make_fake_conda(tmp_path / "viapath")
    environ = {"PATH": "/nonexistent"}
    assert resolve_conda_hook(None, environ, str(home)) is None
    assert resolve_conda_hook("source /x/conda.sh", environ, str(home)) == "source /x/conda.sh"
    assert resolve_conda_hook(str(tmp_path / "missing" / "conda"), environ, str(home)) is None
    with_path = {"PATH": path_conda.bin_dir}
    assert path_conda.binary in resolve_conda_hook(None, with_path, str(home))
    home_conda = make_fake_conda(home / "mambaforge")
    assert resolve_conda_hook(None, with_path, str(home)) == 'eval "$(%s shell.bash hook)"' % home_conda.binary
    with_env = dict(with_path, LEDGER_CONDA_HOOK=env_conda.binary)
    assert env_conda.binary in resolve_conda_hook(None, with_env, str(home))
    manifest = make_fake_conda(tmp_path / "manifest")
    assert manifest.binary in resolve_conda_hook(manifest.binary, with_env, str(home))
    tilde = resolve_conda_hook("~/mambaforge/bin/conda", {}, str(home))
    assert tilde == 'eval "$(%s shell.bash hook)"' % home_conda.binary
