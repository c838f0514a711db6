"""The remote workflow end to end: the real `ledger` CLI on the "laptop" (the user running
pytest) against a "GPU host" reached through the real OpenSSH servers of fixtures_ssh
(user ``ledgertest`` with its own home; aliases gpu-a, and gpu-b behind gpu-a by
ProxyJump). The host side runs from the uploaded bundle on the system python3, which has
no SQLAlchemy, alembic, click or paramiko of its own.

Each test keeps its remote ledger (``--db``) and cwd in a scratch folder of the test
user's home; the bundle goes where it always goes, ``~/.ledger/bundle/<key>/``. Host
state is looked at through the CLI, through `ledger pull` snapshots, or by reading plain
files (never by opening the host's live SQLite file as root).
"""

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import _stop_scheduler, wait_for
from fixtures_conda import make_fake_conda
from fixtures_ssh import free_port, ssh_env  # noqa: F401  (pytest fixture)
from fixtures_run import assert_no_gpu_shared, gpu_intervals

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

LEDGER = [sys.executable, "-m", "ledger.cli.main"]
FAKE_VERSIONS = []      # bundle versions the tests installed on the host, removed at the end


@dataclass
class Host:
    """The test user's side (scratch folder, stand-in conda) and the laptop's environment."""

    env: object                 # the SshEnv
    scratch: Path               # in the test user's home, owned by it
    conda: str                  # the stand-in conda, runnable by the test user
    laptop_env: dict
    laptop: Path

    def ledger(self, *args, check=True, timeout=150, env=None):
        res = subprocess.run(LEDGER + [str(a) for a in args], capture_output=True, text=True,
                             timeout=timeout, env=env or self.laptop_env, cwd=str(self.laptop))
        if check and res.returncode != 0:
            raise AssertionError("ledger %s failed (%d):\n%s\n%s" % (
                " ".join(map(str, args)), res.returncode, res.stdout, res.stderr))
        return res

    def popen(self, *args, env=None):
        return subprocess.Popen(LEDGER + [str(a) for a in args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env or self.laptop_env,
                                cwd=str(self.laptop))

    def folder(self, name):
        """A fresh folder owned by the test user; returns (folder, ~-relative cwd, ledger path)."""
        path = self.scratch / name
        self.env.run_as_user("mkdir -p -m 700 %s/work" % path)
        return path, "~/%s/work" % path.relative_to(self.env.home), path / "ledger" / "ledger.db"

    def manifest(self, name, text, **fmt):
        """A manifest on the laptop. Projects get this session's token: run ids (and so
        screen names) of two test sessions on one machine never meet."""
        if "project" in fmt:
            fmt["project"] = "%s_%s" % (fmt["project"], self.scratch.name[-8:])
        path = self.laptop / ("%s.yaml" % name)
        path.write_text(textwrap.dedent(text).format(conda=self.conda, **fmt))
        return path

    def pull(self, db, name):
        dest = self.laptop / ("%s-%s.db" % (name, secrets.token_hex(3)))
        self.ledger("--db", db, "pull", "--host", "gpu-a", "-o", dest)
        return dest

    def accepted(self, server="a"):
        """How many SSH logins the server has accepted so far (its own log says)."""
        srv = self.env.server_a if server == "a" else self.env.server_b
        return srv.log_text().count("Accepted publickey for %s" % self.env.user)


def chown_tree(path, uid, gid):
    for root, _dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in files:
            os.chown(os.path.join(root, name), uid, gid)


@pytest.fixture(scope="module")
def host(ssh_env, tmp_path_factory):  # noqa: F811
    scratch = ssh_env.home / ("lt-remote-" + secrets.token_hex(4))
    ssh_env.run_as_user("mkdir -m 700 %s" % scratch)
    fake = make_fake_conda(scratch / "conda", envs=("torch",))
    chown_tree(str(scratch / "conda"), ssh_env.uid, os.stat(ssh_env.home).st_gid)
    laptop = tmp_path_factory.mktemp("laptop")
    known_hosts = laptop / "known_hosts"
    shutil.copyfile(ssh_env.known_hosts_path, known_hosts)
    env = dict(os.environ, LEDGER_SSH_CONFIG=str(ssh_env.config_path),
               LEDGER_KNOWN_HOSTS=str(known_hosts), LEDGER_HOME=str(laptop / "dot-ledger"))
    env.pop("LEDGER_DB", None)
    env.pop("LEDGER_BUNDLE_VERSION", None)
    try:
        yield Host(ssh_env, scratch, fake.binary, env, laptop)
    finally:
        for db in scratch.glob("*/ledger/ledger.db"):
            _stop_scheduler(str(db))
        if not os.environ.get("LEDGER_TEST_KEEP"):      # keep the host side to look at
            shutil.rmtree(scratch, ignore_errors=True)
        bundles = ssh_env.home / ".ledger" / "bundle"
        for version in FAKE_VERSIONS:
            for path in bundles.glob(version + "-*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


SWEEP = """\
project: {project}
cwd: {cwd}
ssh: gpu-a
conda: torch
conda_hook: {conda}
gpu_provider: sim:2x80G,lag=0.3
launcher: screen
gpu_free_threshold_mib: 500
stale_grace: 2
grid:
  seed: [{seeds}]
template:
  id: "s${{seed}}"
  cmd: >-
    echo "conda env: $CONDA_DEFAULT_ENV; pythonpath: $PYTHONPATH" &&
    python3 -m ledger.sim job --mem 20000 --seconds {seconds} --out results/s${{seed}}.json
  output_check: results/s${{seed}}.json
"""


def run_of(stdout):
    return re.search(r"run (\S+) \(\d+ jobs\)", stdout).group(1)


def summary_file(folder, run):
    return folder / "work" / "experiment_queue" / run / "summary.md"


def wait_finished(folder, run, timeout=90):
    """The scheduler writes summary.md when the run has ended (a plain file: safe to read)."""
    path = summary_file(folder, run)
    wait_for(path.exists, timeout=timeout, interval=0.2, what="run %s to finish on the host" % run)
    return path.read_text()


def read_events(db_file):
    from ledger.store import open_store
    with open_store(str(db_file), readonly=True) as store:
        return list(store.read())


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def scheduler_pid_of(db):
    """The scheduler's pid once it holds the lock and has written its pid (else None)."""
    from ledger.scheduler import scheduler_pid
    pid = scheduler_pid(str(db))
    return pid if pid is None or pid > 0 else None


def fake_version():
    version = "0.0.%d" % (1000 + secrets.randbelow(10 ** 6))
    FAKE_VERSIONS.append(version)
    return version


def key_for_version(version, monkeypatch):
    from ledger import bundle
    monkeypatch.setenv("LEDGER_BUNDLE_VERSION", version)
    key = bundle.bundle_key()
    monkeypatch.delenv("LEDGER_BUNDLE_VERSION")
    return key


# ---- check ---------------------------------------------------------------------------

CHECK = """\
project: checked
cwd: {cwd}
conda: {env}
conda_hook: {conda}
gpu_provider: sim:2x80G
gpus: {gpus}
max_parallel: 2
phases:
  - name: train
    grid: {{N: [1, 2]}}
    preconditions: [{{type: checkpoint_exists, path: "init/N${{N}}.pt"}}]
    template:
      id: "teacher_N${{N}}"
      cmd: python3 -m ledger.sim job --seconds 1 --out ckpt/N${{N}}.pt
  - name: distill
    depends_on: train
    grid: {{N: [1]}}
    preconditions: [{{type: checkpoint_exists, path: "ckpt/N${{N}}.pt"}}]
    template:
      id: "student_N${{N}}"
      cmd: python3 -m ledger.sim job --seconds 1 --out out/N${{N}}.json
"""


def test_check_reports_every_precondition_per_job_through_a_jump_host(host):
    folder, cwd, db = host.folder("check")
    host.env.run_as_user("mkdir -p %s/work/init && touch %s/work/init/N1.pt" % (folder, folder))

    good = host.manifest("check-good", CHECK, cwd=cwd, env="torch", gpus="[0, 1]")
    res = host.ledger("--db", db, "check", good, "--host", "gpu-b", check=False)
    out = res.stdout
    assert res.returncode == 1, res.stdout + res.stderr
    assert "host gpu-b (via gpu-a):" in out
    a, b = host.env.server_a, host.env.server_b
    for line in ("[ok] host reachable: %s@%s:%d -> %s@%s:%d" % (host.env.user, a.address, a.port,
                                                                host.env.user, b.address, b.port),
                 "[ok] python3 >= 3.9: 3.", "[ok] screen present: /", "[ok] cwd exists: %s/work" % folder,
                 "[ok] conda env torch: found", "[ok] GPUs free for max_parallel=2: 2 of 2 GPUs free now (0,1)"):
        assert line in out, out
    assert "jobs: 2 ready, 1 blocked" in out
    assert "  teacher_N2: checkpoint_exists: init/N2.pt not found" in out
    assert "teacher_N1:" not in out           # its checkpoint is there
    # the student's checkpoint comes from the train phase: noted, not blocked
    assert "student_N1 (ready, waits): checkpoint_exists: ckpt/N1.pt not there yet (phase train runs first)" in out

    bad = host.manifest("check-bad", CHECK, cwd=cwd + "/missing", env="nope", gpus="[0, 1, 5]")
    res = host.ledger("--db", db, "check", bad, "--host", "gpu-b", check=False)
    out = res.stdout
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[FAIL] cwd exists: %s/work/missing" % folder in out
    assert "[FAIL] conda env nope: no conda env named nope" in out
    assert "[FAIL] GPUs exist: GPU 5 not on this host (it has 0,1)" in out
    assert "[ok] GPUs free for max_parallel=2: 2 of 2 GPUs free now (0,1)" in out
    assert "jobs: 0 ready, 3 blocked" in out
    assert "  teacher_N1: checkpoint_exists: init/N1.pt not found; host: cwd exists failed; " \
           "host: conda env nope failed" in out

    # submit runs the same check and refuses, naming each problem on its own line
    res = host.ledger("--db", db, "submit", bad, "--host", "gpu-b", check=False)
    assert res.returncode == 2
    errors = res.stderr.splitlines()
    assert "ledger: error: gpu-b: cwd exists failed: %s/work/missing" % folder in errors
    assert "ledger: error: gpu-b: conda env nope failed: no conda env named nope" in errors
    assert "Traceback" not in res.stderr
    assert not db.exists()                    # nothing was recorded


# ---- submit, then the whole run on the host while the laptop is away -------------------

def test_submit_then_the_run_completes_with_the_laptop_gone_and_is_audited_from_it(host):
    folder, cwd, db = host.folder("complete")
    m = host.manifest("complete", SWEEP, project="complete", cwd=cwd, seeds="0, 1, 2", seconds=1)
    before = host.accepted()
    out = host.ledger("--db", db, "submit", m).stdout          # host from the manifest's ssh:
    assert host.accepted() - before == 1                       # check, upload, submit: one connection
    run = run_of(out)
    assert "submitted run %s (3 jobs) on gpu-a" % run in out
    assert "ledger status --host gpu-a --watch" in out

    # the bundle: a private folder of this program's key, owned by the host's user
    from ledger.bundle import current_key
    bundle = host.env.home / ".ledger" / "bundle" / current_key()
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(bundle / "ledger" / "api.py").st_mode) == 0o600
    assert os.stat(bundle).st_uid == host.env.uid
    assert (bundle / "vendor" / "sqlalchemy").is_dir() and not list(bundle.glob("vendor/**/*.so"))
    assert not list(bundle.parent.glob(current_key() + ".tmp-*"))

    # the scheduler runs detached: its own session, not below any sshd; cut every SSH
    # connection and it goes on
    pid = wait_for(lambda: scheduler_pid_of(db), timeout=30, what="the scheduler to take the lock")
    assert os.getsid(pid) == pid
    serving = host.env.server_a.connection_pids() + host.env.server_b.connection_pids()
    assert pid not in serving
    host.env.kill_connections()
    summary = wait_finished(folder, run)
    assert "3" in summary and run in summary

    # from the laptop: each command one connection
    before = host.accepted()
    status = host.ledger("--db", db, "status", run, "--host", "gpu-a").stdout
    assert "run %s (finished): completed 3" % run in status
    replay = host.ledger("--db", db, "replay", "--host", "gpu-a", "--run", run, "--kind", "completed",
                         "--kind", "run_finished").stdout
    assert replay.count(" completed ") == 3 and "run_finished" in replay
    history = host.ledger("--db", db, "history", "s1", "--host", "gpu-a").stdout
    assert "s1 (run %s, phase main): completed" % run in history
    assert re.search(r"\n\s*1\s+[01]\s+\S+ \S+\s+\S+ \S+\s+0\s+no\s+success\s+-\s+\S+/s1.1.log", history), history
    md = host.ledger("--db", db, "summary", run, "--host", "gpu-a").stdout
    assert md == summary                                     # the same replay, rendered there
    logs = host.ledger("--db", db, "logs", "s2", "--host", "gpu-a")
    assert "conda env: torch;" in logs.stdout                # activated through the manifest's hook
    pythonpath = logs.stdout.split("pythonpath: ", 1)[1].splitlines()[0]
    assert "vendor" not in pythonpath                        # jobs never see ledger's own copies
    assert "s2.1.log" in logs.stderr
    sql = host.ledger("--db", db, "sql", "SELECT job, exit_code FROM job_attempts ORDER BY job",
                      "--host", "gpu-a", "--json").stdout
    assert '"exit_code": 0' in sql and sql.count('"job"') == 3
    assert host.accepted() - before == 6

    # pull: a consistent snapshot through SQLite's backup API, for local post-mortem SQL
    dest = host.pull(db, "complete")
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert not os.path.exists(str(dest) + "-wal")
    local = host.ledger("--db", dest, "sql", "SELECT count(*) AS n FROM events WHERE kind = 'completed'")
    assert local.stdout.split()[-1] == "3"
    assert not list(db.parent.glob("pull-*"))                # the host's temporary copy is gone
    kinds = [e.kind for e in read_events(dest)]
    assert kinds.count("scheduler_started") == 1 and kinds[-1] == "scheduler_stopped"


# ---- host keys ---------------------------------------------------------------------------

def test_unknown_host_key_is_refused_with_its_fingerprint_then_accepted_with_the_flag(host):
    known = host.laptop / "known_hosts_without_b"
    shutil.copyfile(host.env.known_hosts_missing_b, known)
    env = dict(host.laptop_env, LEDGER_KNOWN_HOSTS=str(known))
    db = host.scratch / "no-such-ledger.db"
    fp = subprocess.run(["ssh-keygen", "-lf", str(host.env.host_key_b) + ".pub"],
                        capture_output=True, text=True, check=True).stdout.split()[1]

    res = host.ledger("--db", db, "status", "--host", "gpu-b", env=env, check=False)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert fp in res.stderr and "unknown host key" in res.stderr
    assert "--accept-new-host-key" in res.stderr
    assert known.read_text() == host.env.known_hosts_missing_b.read_text()   # nothing trusted

    # accepted: the key is remembered and the command reaches the host (whose answer is
    # that this ledger does not exist)
    res = host.ledger("--db", db, "status", "--host", "gpu-b", "--accept-new-host-key", env=env, check=False)
    assert res.returncode == 2 and "no ledger at %s" % db in res.stderr, res.stderr
    res = host.ledger("--db", db, "status", "--host", "gpu-b", env=env, check=False)
    assert "no ledger at" in res.stderr

    # a changed key is refused even with the flag
    wrong = host.laptop / "known_hosts_wrong_a"
    shutil.copyfile(host.env.known_hosts_wrong_a, wrong)
    res = host.ledger("status", "--host", "gpu-a", "--accept-new-host-key",
                      env=dict(host.laptop_env, LEDGER_KNOWN_HOSTS=str(wrong)), check=False)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    assert "HOST KEY CHANGED" in res.stderr


# ---- dropped connections -------------------------------------------------------------

def test_connection_dropped_mid_upload_then_a_clean_resubmit_with_exactly_one_run(host, monkeypatch):
    folder, cwd, db = host.folder("dropped")
    m = host.manifest("dropped", SWEEP, project="dropped", cwd=cwd, seeds="0, 1", seconds=1)
    version = fake_version()                 # a bundle this host has never seen
    key = key_for_version(version, monkeypatch)
    env = dict(host.laptop_env, LEDGER_BUNDLE_VERSION=version)
    bundles = host.env.home / ".ledger" / "bundle"

    proc = host.popen("--db", db, "submit", m, env=env)
    uploading = wait_for(lambda: list(bundles.glob(key + ".tmp-*")), timeout=60, interval=0.002,
                         what="the bundle upload to start")
    killed = host.env.kill_connections("a")
    out, err = proc.communicate(timeout=60)
    assert killed and uploading
    assert proc.returncode == 1, out + err
    assert err.splitlines() == ["ledger: error: connection to gpu-a dropped while uploading the ledger "
                                "bundle %s; nothing was installed or submitted, run the command again" % key]
    assert not (bundles / key).exists()      # never a half bundle under the real name
    assert not db.exists()                   # and nothing submitted

    out = host.ledger("--db", db, "submit", m, env=env).stdout
    run = run_of(out)
    assert (bundles / key / "run.py").exists()
    assert not list(bundles.glob(key + ".tmp-*"))          # the dead upload's leftovers were swept
    again = host.ledger("--db", db, "submit", m, env=env).stdout
    assert "already submitted as run %s" % run in again     # same content, same run

    # the connection dropped while the host records the run: the client reconnects and
    # reruns the request, which finds the run that request made
    m2 = host.manifest("dropped2", SWEEP, project="dropped2", cwd=cwd, seeds="0", seconds=1)
    before = host.accepted()
    proc = host.popen("--db", db, "submit", m2, "--no-check", env=env)

    def agent_submitting():
        return [p for p in host.env.server_a.connection_pids()
                if "agent submit" in proc_cmdline(p) and str(db) in proc_cmdline(p)]
    wait_for(agent_submitting, timeout=60, interval=0.002, what="the host to run the submit")
    sshd = [p for p in host.env.server_a.connection_pids() if proc_comm(p).startswith("sshd")]
    for p in sshd:
        os.kill(p, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    run2 = run_of(out)
    assert "submitted run %s (1 jobs)" % run2 in out
    assert host.accepted() - before == 2                    # the reconnect
    wait_finished(folder, run)
    wait_finished(folder, run2)
    events = read_events(host.pull(db, "dropped"))
    submitted = [e.run for e in events if e.kind == "run_submitted"]
    assert sorted(submitted) == sorted([run, run2])        # exactly one run each, none half-made
    for r, n in ((run, 2), (run2, 1)):
        assert sum(1 for e in events if e.kind == "submitted" and e.run == r) == n
        assert sum(1 for e in events if e.kind == "completed" and e.run == r) == n

    res = host.ledger("--db", db, "submit", m, "--new-run", env=env)
    assert run_of(res.stdout) not in (run, run2)


# ---- two runs, one host, its GPUs ------------------------------------------------------

def test_two_runs_on_one_host_share_its_gpus_without_ever_colliding(host):
    folder, cwd, db = host.folder("shared")
    runs = []
    for name in ("first", "second"):
        m = host.manifest(name, SWEEP, project=name, cwd=cwd, seeds="0, 1, 2", seconds=2)
        runs.append(run_of(host.ledger("--db", db, "submit", m).stdout))
    for run in runs:
        wait_finished(folder, run)
    events = read_events(host.pull(db, "shared"))
    assert sum(1 for e in events if e.kind == "completed") == 6
    assert sum(1 for e in events if e.kind == "scheduler_started") == 1    # one scheduler took both
    spans = gpu_intervals(events)
    assert sorted(spans) == [0, 1]
    assert not [e for e in events if e.kind == "launch_requested" and not any(
        who == (e.run, e.job, e.attempt) for held in spans.values() for _s, _e, who in held)], \
        "attempts that never ended"
    assert_no_gpu_shared(events)
    flat = [(s, e, who[0]) for held in spans.values() for s, e, who in held]
    assert any(r1 == runs[0] and r2 == runs[1] and s1 < e2 and s2 < e1
               for s1, e1, r1 in flat for s2, e2, r2 in flat), "the two runs never ran side by side"


# ---- upgrade -------------------------------------------------------------------------

def test_a_host_on_an_older_bundle_is_upgraded_and_its_running_jobs_adopted(host, monkeypatch):
    from ledger.bundle import current_key
    folder, cwd, db = host.folder("upgrade")
    old_version = fake_version()
    old_key = key_for_version(old_version, monkeypatch)
    old_env = dict(host.laptop_env, LEDGER_BUNDLE_VERSION=old_version)
    long = host.manifest("long", SWEEP, project="long", cwd=cwd, seeds="0, 1", seconds=6)
    run_old = run_of(host.ledger("--db", db, "submit", long, env=old_env).stdout)
    old_pid = wait_for(lambda: scheduler_pid_of(db), timeout=30, what="the scheduler to take the lock")
    assert old_key in proc_cmdline(old_pid)
    logs = folder / "work" / "experiment_queue" / run_old / "logs"
    wait_for(lambda: len(list(logs.glob("*.1.log"))) == 2, timeout=60, what="both long jobs to start")

    short = host.manifest("short", SWEEP, project="short", cwd=cwd, seeds="7", seconds=1)
    out = host.ledger("--db", db, "submit", short).stdout
    run_new = run_of(out)
    assert "ran the older bundle %s: stopped cleanly and restarted" % old_key in out
    new_pid = wait_for(lambda: scheduler_pid_of(db) not in (None, old_pid) and scheduler_pid_of(db),
                       timeout=30, what="the new scheduler to take the lock")
    assert current_key() in proc_cmdline(new_pid)
    wait_for(lambda: not process_running(old_pid), timeout=30, what="the old scheduler to exit")
    for run in (run_old, run_new):
        wait_finished(folder, run)

    events = read_events(host.pull(db, "upgrade"))
    sched = [(e.kind, e.data.get("bundle")) for e in events if e.kind.startswith("scheduler_")]
    assert sched[:3] == [("scheduler_started", old_key), ("scheduler_stopped", None),
                         ("scheduler_started", current_key())]
    stopped = next(e for e in events if e.kind == "scheduler_stopped")
    assert "SIGTERM" in stopped.data["reason"]
    asked = next(e for e in events if e.kind == "stop_requested")     # who upgraded, and why
    assert asked.data["reason"] == "upgrade from bundle %s to %s" % (old_key, current_key())
    assert asked.data["actor"].startswith(host.env.user + "@")
    restart_seq = [e.seq for e in events if e.kind == "scheduler_started"][1]
    for job in ("s0", "s1"):
        mine = [e for e in events if e.run == run_old and e.job == job]
        assert [e.kind for e in mine].count("launch_requested") == 1      # never launched twice
        adopted = [e for e in mine if e.kind == "adopted"]
        assert adopted and adopted[0].seq > restart_seq                  # the new scheduler took it
        assert mine[-1].kind == "completed" and mine[-1].attempt == 1


# ---- manual actions ----------------------------------------------------------------

def test_cancel_and_retry_through_the_host(host):
    folder, cwd, db = host.folder("manual")
    m = host.manifest("manual", SWEEP, project="manual", cwd=cwd, seeds="0", seconds=5)
    run = run_of(host.ledger("--db", db, "submit", m).stdout)
    pidfile = host.env.home / folder / "ledger" / "runs" / run / "s0.1.pid"
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=60, what="the job to start")
    job_pid = int(pidfile.read_text())
    out = host.ledger("--db", db, "cancel", "s0", "--host", "gpu-a").stdout
    assert out.strip() == "cancelled 1 job(s) of run %s: s0" % run
    wait_for(lambda: not process_running(job_pid), timeout=30, what="the cancelled job to be killed")
    out = host.ledger("--db", db, "retry", "s0", "--host", "gpu-a").stdout
    assert out.strip() == "s0 of run %s will run again as attempt 2" % run
    # the run ended when its only job was cancelled and is reopened by the retry
    summary = summary_file(folder, run)
    wait_for(lambda: summary.exists() and "1 total, 1 completed" in summary.read_text(), timeout=60,
             interval=0.2, what="the retried job to complete")
    events = [e for e in read_events(host.pull(db, "manual")) if e.job == "s0"]
    cancelled = next(e for e in events if e.kind == "cancelled")
    assert cancelled.data["actor"].startswith(host.env.user + "@")     # recorded on the host, as its user
    assert [e.kind for e in events if e.kind in ("cancelled", "manual_retry", "completed")] == \
        ["cancelled", "manual_retry", "completed"]
    assert events[-1].attempt == 2


# ---- hosts -----------------------------------------------------------------------------

def test_hosts_lists_each_host_with_its_scheduler_runs_and_gpus(host, tmp_path):
    folder, cwd, db = host.folder("hosts")
    env = dict(host.laptop_env, LEDGER_HOME=str(tmp_path / "dot-ledger"))
    down = host.env.write_config("hosts_config", "Host gpu-down\n    HostName 127.0.0.1\n    Port %d\n"
                                 "    User %s\n" % (free_port("127.0.0.1"), host.env.user))
    env["LEDGER_SSH_CONFIG"] = str(down)
    m = host.manifest("hosts", SWEEP, project="hosts", cwd=cwd, seeds="0", seconds=4)
    run = run_of(host.ledger("--db", db, "submit", m, env=env).stdout)
    logs = folder / "work" / "experiment_queue" / run / "logs"
    wait_for(lambda: list(logs.glob("s0.1.log")), timeout=60, what="the job to start")
    res = host.ledger("--db", db, "status", "--host", "gpu-down", env=env, check=False)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1
    assert "gpu-down: connection refused by 127.0.0.1:" in res.stderr
    # a host this laptop used before, down now
    import json
    seen_file = tmp_path / "dot-ledger" / "hosts.json"
    seen = json.loads(seen_file.read_text())
    assert list(seen) == ["gpu-a"] and seen["gpu-a"]["dbs"] == [str(db)]
    seen["gpu-down"] = {"last_seen": time.time() - 86400, "dbs": [None]}
    seen_file.write_text(json.dumps(seen))

    out = host.ledger("hosts", env=env).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) - {"local"} == {"gpu-a", "gpu-down"}, out      # local: if this machine has a ledger
    assert re.search(r"gpu-a\s+running\s+1 \(1 active\)\s+0:\S+/80G 1:\S+/80G", rows["gpu-a"]), out
    assert re.search(r"gpu-down\s+unreachable\s+-\s+gpu-down: connection refused", rows["gpu-down"]), out
    wait_finished(folder, run)
    wait_for(lambda: scheduler_pid_of(db) is None, timeout=30, what="the scheduler to exit")
    out = host.ledger("hosts", "--json", env=env).stdout
    row = next(r for r in json.loads(out) if r["host"] == "gpu-a")
    assert row["scheduler"]["running"] is False
    assert [r["state"] for r in row["runs"]] == ["finished"]
    assert row["gpus"] == "0:0/80G 1:0/80G"


# ---- what runs on the host: Python 3.9 -------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from ledger.bundle import build_folder
    dest = tmp_path_factory.mktemp("bundle")
    build_folder(str(dest))
    return dest


def test_everything_in_the_bundle_is_python_3_9_compatible(bundle_dir, tmp_path):
    import ast
    from ledger.bundle import INSTALL_PY
    installer = tmp_path / "install.py"       # runs on the host too, before any bundle is there
    installer.write_text(INSTALL_PY)
    sources = sorted(bundle_dir.rglob("*.py")) + [installer]
    assert len(sources) > 300 and any("/vendor/sqlalchemy/" in str(p) for p in sources)
    for path in sources:       # the grammar, vendored packages included: no match, no except*, ...
        ast.parse(path.read_bytes(), filename=str(path), feature_version=(3, 9))
    # ledger's own code: the standard library and language features it uses (vermin knows
    # which version brought what; the vendored packages guard newer features by version
    # checks vermin cannot follow, and declare their own support: the next test)
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable)) or shutil.which("vermin")
    res = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.9-", "--eval-annotations",
                          "--no-parse-comments", str(bundle_dir / "ledger"), str(bundle_dir / "run.py"),
                          str(installer)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_vendored_packages_support_python_3_9(bundle_dir):
    from importlib.metadata import distribution
    from packaging.specifiers import SpecifierSet
    for name in ("sqlalchemy", "alembic", "mako", "markupsafe", "typing_extensions"):
        assert (bundle_dir / "vendor" / name).exists() or (bundle_dir / "vendor" / (name + ".py")).exists()
        requires = distribution(name).metadata["Requires-Python"] or ""
        assert SpecifierSet(requires).contains("3.9"), "%s needs Python %s" % (name, requires)


def test_the_bundle_needs_nothing_but_the_standard_library(bundle_dir, tmp_path):
    """python3 -S (no site-packages at all): every module of the bundle imports from the
    bundle alone, none pulls in YAML, click, paramiko or tabulate, and the agent answers."""
    modules = sorted(".".join(p.relative_to(bundle_dir).with_suffix("").parts).replace(".__init__", "")
                     for p in (bundle_dir / "ledger").rglob("*.py")
                     if "migrations" not in p.parts and p.name != "__main__.py")
    assert "ledger.summary" in modules and "ledger.scheduler" in modules
    code = ("import importlib, runpy, sys\n"
            "for m in %r: importlib.import_module(m)\n"
            "bad = [m for m in ('yaml', 'click', 'paramiko', 'tabulate') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "sys.argv = ['run.py', 'agent', 'sql', '--db', %r]\n"
            "runpy.run_path(%r, run_name='__main__')\n" % (modules, str(tmp_path / "l.db"), str(bundle_dir / "run.py")))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": "%s:%s/vendor" % (bundle_dir, bundle_dir)}
    res = subprocess.run(["/usr/bin/python3", "-S", "-c", code], input='{"query": "SELECT 1"}',
                         capture_output=True, text=True, env=env, timeout=60)
    assert '"ok": false' in res.stdout and "no ledger at" in res.stdout, res.stdout + res.stderr
