"""Chaos: the scheduler killed, stopped, starved of disk; torn copies of the ledger.

Real processes, real screen sessions, the GPU simulator, a real SQLite file on a real
(tiny) filesystem. Each test names the guarantee it proves; docs/reliability.md lists them.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import closing

import pytest

from conftest import wait_for
from fixtures_chaos import kill_storm
from fixtures_run import (events, kill_scheduler, ledger, scheduler_pid, state, submit,
                          wait_event, wait_finished, write_manifest)
from fixtures_store import fill_disk, tiny_tmpfs

SIM_JOB = "python3 -m ledger.sim job"


def _starts_manifest(tmp_path, project, n, gpus, seconds, mem=10000, extra="", output=True, timeout=None):
    (tmp_path / "work" / "starts").mkdir(parents=True, exist_ok=True)
    return write_manifest(tmp_path, """
        project: {project}
        cwd: {{cwd}}
        gpu_provider: "sim:{gpus}x80G,lag=0.1{timeout}"
        {extra}
        grid: {{{{i: [{ids}]}}}}
        template:
          id: "j${{{{i}}}}"
          cmd: "echo start >> starts/j${{{{i}}}}; {job} --mem {mem} --ramp 0.1 --seconds {seconds} --out out/j${{{{i}}}}.json"
          {check}
        """.format(check="output_check: out/j${{i}}.json" if output else "", project=project,
                   timeout=",timeout=%g" % timeout if timeout else "", gpus=gpus, extra=extra, ids=", ".join(str(i) for i in range(1, n + 1)),
                   job=SIM_JOB, mem=mem, seconds=seconds))


def _start_counts(tmp_path, n):
    folder = tmp_path / "work" / "starts"
    return {"j%d" % i: len((folder / ("j%d" % i)).read_text().splitlines()) if (folder / ("j%d" % i)).exists()
            else 0 for i in range(1, n + 1)}


def _assert_gap_free(db):
    seqs = [e.seq for e in events(db)]
    assert seqs == list(range(1, len(seqs) + 1))


# ---- SIGKILL at random moments -------------------------------------------------

def test_thirty_sigkills_lose_nothing_launch_nothing_twice_and_share_no_gpu(tmp_path, ledger_db):
    """24 jobs on 3 simulated GPUs; the scheduler SIGKILLed 30 times: at random moments, while
    a launch is requested but not confirmed, and inside an append's write/sync system call.
    The larger storm is `scripts/chaos.py`."""
    result = kill_storm(str(tmp_path / "storm"), kills=30, jobs=24, gpus=3, seconds=2.0, seed=5,
                        log=lambda _msg: None)
    assert result["problems"] == []
    assert result["kills"] == 30
    assert result["by_mode"]["launching"] >= 5 and result["by_mode"]["append"] >= 5, result
    assert result["detail"]["launch_before_session"] >= 1, result     # a launch intended, no session yet
    assert result["completed"] == 24 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["gpu_shared"] == 0 and result["gap_free"] and result["replay_equal"]


# ---- SIGTERM / SIGINT ---------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly_jobs_go_on_and_the_next_start_adopts_them(tmp_path, ledger_db, sig):
    m = _starts_manifest(tmp_path, "sig%d" % sig, 2, 2, 4.0, mem=1000)
    run = submit(m)
    launched = wait_event(ledger_db, run, "launched", count=2)
    pids = [e.data["pid"] for e in launched]
    sched = scheduler_pid(ledger_db)
    os.kill(sched, sig)
    wait_for(lambda: scheduler_pid(ledger_db) is None, timeout=15, what="the scheduler to exit")
    (stopped,) = events(ledger_db, None, ["scheduler_stopped"])
    assert stopped.data["pid"] == sched and stopped.data["reason"] == (
        "stopped by %s; running jobs go on" % sig.name)
    assert all(_running(p) for p in pids)                       # the jobs were not touched
    assert state(ledger_db).runs[run].counts()["running"] == 2
    _assert_gap_free(ledger_db)
    submit(m)                                                   # the next start (same plan, same run)
    final = wait_finished(ledger_db, run)
    adopted = events(ledger_db, run, ["adopted"])
    assert sorted(e.data["pid"] for e in adopted) == sorted(pids)
    assert final.counts()["completed"] == 2
    assert _start_counts(tmp_path, 2) == {"j1": 1, "j2": 1}
    assert not events(ledger_db, run, ["launch_lost"])


# ---- the disk fills up ------------------------------------------------------

def test_disk_full_halts_launching_says_why_keeps_the_record_and_carries_on(tmp_path, ledger_db):
    """The ledger's folder is a 4 MB tmpfs (its scheduler.log and control files too, as on a
    real full home disk); the jobs' own folder is elsewhere."""
    with tiny_tmpfs(os.path.dirname(ledger_db), size="4m") as folder, _stopped_before_unmount(ledger_db):
        (tmp_path / "gpus").mkdir()
        os.symlink(str(tmp_path / "gpus"), os.path.join(folder, "sim"))   # real GPUs are not on that disk
        m = _starts_manifest(tmp_path, "diskfull", 6, 1, 1.0, mem=1000, output=False)   # exit codes decide
        run = submit(m)
        wait_event(ledger_db, run, "launched", "j1")
        pid = scheduler_pid(ledger_db)
        filler = HungryFiller(os.path.join(folder, "filler"))    # takes every byte that is freed, too
        # the next append fails; the scheduler halts launching and says why where `status` reads it
        out = wait_for(lambda: (lambda o: o if "launching halted" in o else None)(ledger("status", run).stdout),
                       timeout=30, what="status to say launching is halted")
        assert "ledger disk full at %s" % ledger_db in out and "until space is freed" in out
        recorded = events(ledger_db)
        starts = _start_counts(tmp_path, 6)
        # while full: j1 ends, yet nothing is recorded and nothing launched; the scheduler stays up
        j1 = events(ledger_db, run, ["launched"])[0].data["pid"]
        wait_for(lambda: not _running(j1), timeout=30, what="j1 to end")
        holds_for(4.0, lambda: scheduler_pid(ledger_db) == pid and events(ledger_db) == recorded
                  and _start_counts(tmp_path, 6) == starts, what="nothing recorded or launched while full")
        res = ledger("pause", check=False)       # a user's append fails cleanly too
        assert res.returncode == 1 and "disk full" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        filler.stop()
        final = wait_finished(ledger_db, run)
        assert scheduler_pid(ledger_db) in (None, pid)
        assert final.counts()["completed"] == 6, _story(ledger_db)
        j1_end = [e for e in events(ledger_db, run, ["exited"]) if e.job == "j1"]
        assert [e.data["exit_code"] for e in j1_end] == [0]      # its exit record survived the full disk
        assert _start_counts(tmp_path, 6) == {"j%d" % i: 1 for i in range(1, 7)}
        evs = events(ledger_db)
        assert evs[:len(recorded)] == recorded                       # nothing recorded was damaged
        _assert_gap_free(ledger_db)
        halted = [e for e in evs if e.kind == "launching_halted"]
        assert len(halted) == 1 and "disk full" in halted[0].data["reason"]
        assert [e.kind for e in evs].count("launching_resumed") == 1
        assert "launching halted" not in ledger("status", run).stdout
        log = open(os.path.join(folder, "scheduler.log")).read()
        assert "launching resumed" in log


class HungryFiller:
    """Another process filling the disk: it writes until the disk is full, then keeps taking
    every page that is freed (the scheduler's, the wrappers' scratch files) until ``stop``."""

    def __init__(self, path):
        import threading
        self.path = path
        fill_disk(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._eat, daemon=True)
        self.thread.start()

    def _eat(self):
        while not self.done.is_set():
            try:
                os.write(self.fd, b"\0" * 4096)
            except OSError:
                try:
                    os.write(self.fd, b"\0")       # the tail of a partly used page
                except OSError:
                    self.done.wait(0.002)

    def stop(self):
        self.done.set()
        self.thread.join(5)
        os.close(self.fd)
        os.unlink(self.path)


@contextlib.contextmanager
def _stopped_before_unmount(db):
    """The ledger fixture stops the scheduler and its jobs through files in the ledger folder;
    when that folder is a tmpfs unmounted at the end of the test, do it while it is still there."""
    try:
        yield
    finally:
        from conftest import _stop_scheduler
        _stop_scheduler(db)


def _story(db):
    """The ledger in one line per event, for assertion messages."""
    return "\n".join("%d %s %s#%s %s" % (e.seq, e.kind, e.job, e.attempt,
                                         {k: v for k, v in e.data.items() if k not in ("plan", "log_tail")})
                     for e in events(db))


def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return not f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def holds_for(seconds, predicate, what, story=lambda: ""):
    """A negative guarantee needs a window: ``predicate`` must hold at every look for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), "%s: broken\n%s" % (what, story())
        time.sleep(0.1)


# ---- torn databases ---------------------------------------------------------------

WRITER = """
import sys
from ledger.events import Event
from ledger.store import open_store
s = open_store(sys.argv[1])
if s.last_seq() == 0:
    s.append([Event("run_submitted", "r1")])
i = s.last_seq()
while True:
    # two events per append, payloads of 0..28 KB: transactions span several pages and the
    # WAL is checkpointed into the main file now and then
    stored = s.append([Event("paused", "r1", data={"pad": "x" * (i * 977 % 28000)}), Event("resumed", "r1")])
    i += 1
    print(stored[-1].seq, flush=True)
"""


class _Writer:
    """A writer process appending in a loop; ``acked`` is the last seq it saw committed."""

    def __init__(self, db):
        import threading
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, db], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.seqs = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.seqs.append(int(line))

    @property
    def acked(self):
        return self.seqs[-1] if self.seqs else 0

    def progress(self, than):
        wait_for(lambda: len(self.seqs) > than, timeout=20, what="the writer to append again")

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.thread.join(10)


def _freeze_mid_append(proc, db):
    """SIGSTOP the writer at an instant when it holds SQLite's write lock (inside an append)."""
    import random
    from fixtures_chaos import _stopped_inside_append
    rng = random.Random(proc.pid)
    wait_for(lambda: _stopped_inside_append(proc.pid, db, rng), timeout=20, interval=0,
             what="the writer frozen inside an append")


def _consistent_prefix(path, reference=None):
    """Open (read-only, as `ledger status` does) and replay: gap-free, whole transactions only,
    and (given the full ledger) equal to its first events. Returns the number of events."""
    from ledger.store import open_store
    with open_store(path, readonly=True) as store:
        evs = list(store.read())
        store.state()                                    # the projection folds without error
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    kinds = [e.kind for e in evs[1:]]
    assert kinds == ["paused", "resumed"] * (len(kinds) // 2) and len(kinds) % 2 == 0, "half a transaction"
    if reference is not None:
        assert evs == reference[:len(evs)]
    return len(evs)


def test_copies_frozen_mid_append_and_files_left_by_kill_9_replay_to_a_consistent_prefix(tmp_path):
    """A copy of db + WAL taken at one instant while the writer is inside an append (frozen
    with SIGSTOP while it holds the WAL write lock, as a filesystem snapshot would catch it),
    and the files a writer SIGKILLed mid-append leaves behind, open and replay to a prefix."""
    import shutil
    db = str(tmp_path / "ledger" / "ledger.db")
    from ledger.store import open_store
    open_store(db).close()
    copies, kills_checked = [], 0
    writer = _Writer(db)
    try:
        for round_ in range(12):
            writer.progress(len(writer.seqs) + 1)           # it is really writing (not just resumed)
            _freeze_mid_append(writer, db)
            if round_ % 3 == 2:                            # kill -9 mid-append; the files stay as they are
                writer.kill()
                n = _consistent_prefix(db)
                assert n >= writer.acked                    # nothing acknowledged was lost
                assert n <= writer.acked + 2                # at most the append in flight landed, whole
                kills_checked += 1
                writer = _Writer(db)                        # a writer carries on on the same files
                continue
            folder = tmp_path / ("copy%d" % round_)
            folder.mkdir()
            for suffix in ("", "-wal"):                     # no -shm: a copy elsewhere has none
                if os.path.exists(db + suffix):
                    shutil.copyfile(db + suffix, str(folder / ("ledger.db" + suffix)))
            os.kill(writer.pid, signal.SIGCONT)
            copies.append(str(folder / "ledger.db"))
    finally:
        writer.kill()
    with open_store(db, readonly=True) as store:
        full = list(store.read())
    assert kills_checked == 4 and len(copies) == 8
    sizes = [_consistent_prefix(c, full) for c in copies]
    assert sizes == sorted(sizes) and sizes[0] > 1


def test_a_damaged_ledger_file_is_a_one_line_error_naming_the_cure(tmp_path):
    """A file torn by a plain `cp` racing a checkpoint, or cut short, cannot be replayed: every
    command says so in one line (and how to copy a live ledger safely), never a traceback."""
    from ledger.events import Event
    from ledger.store import open_store
    db = str(tmp_path / "good.db")
    with open_store(db) as store:
        store.append([Event("run_submitted", "r1")] + [Event("paused", "r1", data={"pad": "x" * 3000})] * 400)
        store.backup(str(tmp_path / "whole.db"))
    with open(str(tmp_path / "whole.db"), "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) // 2])
    scrambled = tmp_path / "scrambled.db"
    scrambled.write_bytes(data[:8192] + os.urandom(40960) + data[8192 + 40960:])
    for path in (cut, scrambled):
        for args in (["status"], ["replay", "--since", "1"], ["sql", "SELECT COUNT(*) FROM events"], ["pause"]):
            res = ledger("--db", str(path), *args, check=False)
            assert res.returncode == 1, (args, res.stdout, res.stderr)
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
            assert "damaged" in res.stderr and "ledger pull" in res.stderr, res.stderr


# ---- nvidia-smi breaking mid-run; conda failing -------------------------------------------

FAULTS = [  # (sim fault mode, GPU it hits or None for all, words the recorded reason must have)
    ("garbage", None, "unreadable output"),
    ("not_found", None, "nvidia-smi"),
    ("mismatch", None, "Driver/library version mismatch"),
    ("err", 0, "ERR!"),
    ("na", 0, "N/A"),
    ("hang", None, "timed out after 2 s"),
]


def test_nvidia_smi_breaking_mid_run_halts_launches_on_unknown_gpus_without_a_crash_loop(tmp_path, ledger_db):
    """One run, one scheduler; nvidia-smi breaks in each way in turn while jobs wait. Each
    fault is recorded once (gpu_unreadable, with the reason) and shown by status; no job
    lands on a GPU that cannot be read; the scheduler stays up; healed, the GPU is recorded
    readable and the run completes with every job started once."""
    from ledger.sim import set_fault
    n = 40
    m = _starts_manifest(tmp_path, "smifaults", n, 2, 0.3, mem=1000, timeout=2)
    run = submit(m)
    wait_event(ledger_db, run, "launched")
    sim_dir = os.path.join(os.path.dirname(ledger_db), "sim")
    sched = scheduler_pid(ledger_db)
    for number, (mode, gpu, words) in enumerate(FAULTS, start=1):
        assert state(ledger_db).runs[run].counts()["pending"] > 0, "no job left waiting to test %s" % mode
        set_fault(sim_dir, mode, gpu)
        (bad,) = wait_event(ledger_db, "-", "gpu_unreadable", count=number, timeout=60)[number - 1:]
        assert bad.data["gpu"] == ("all" if gpu is None else gpu) and words in bad.data["reason"], bad.data
        assert len(bad.data["reason"].splitlines()) == 1
        assert "unreadable: %s" % bad.data["reason"] in ledger("status", run).stdout
        after = bad.seq

        def no_launch_on_unknown_gpu():
            new = [e for e in events(ledger_db, run, ["launch_requested"]) if e.seq > after]
            return all(gpu is not None and gpu not in e.data["gpus"] for e in new)
        holds_for(2.0, lambda: no_launch_on_unknown_gpu() and scheduler_pid(ledger_db) == sched
                  and len(events(ledger_db, "-", ["gpu_unreadable"])) == number,
                  what="no launch onto an unreadable GPU, no repeated event, no restart (%s)" % mode,
                  story=lambda: _story(ledger_db)[-3000:])
        set_fault(sim_dir, "none")
        wait_event(ledger_db, "-", "gpu_readable", count=number, timeout=60)
    final = wait_finished(ledger_db, run, timeout=120)
    assert final.counts()["completed"] == n
    assert set(_start_counts(tmp_path, n).values()) == {1}
    assert scheduler_pid(ledger_db) in (None, sched) and len(events(ledger_db, "-", ["scheduler_started"])) == 1


@pytest.mark.parametrize("hook_works, reason", [
    (False, "conda activation failed: CondaError: Run 'conda init' before 'conda activate'"),
    (None, "conda activation failed: conda: command not found"),
])
def test_a_failing_conda_hook_is_stuck_once_with_condas_reason(tmp_path, ledger_db, monkeypatch, hook_works,
                                                               reason):
    """The job never starts, is recorded stuck with conda's own words after one attempt (a
    launch problem is not retried), and the scheduler moves on to the other jobs."""
    from fixtures_conda import make_fake_conda
    from ledger.launchers import resolve_conda_hook
    monkeypatch.delenv("LEDGER_CONDA_HOOK", raising=False)
    if hook_works is None:
        if resolve_conda_hook(None, os.environ, os.path.expanduser("~")):
            pytest.skip("a real conda is installed here: 'conda: command not found' cannot happen")
        hook = ""
    else:
        hook = "conda_hook: %s" % make_fake_conda(tmp_path / "conda", hook_works=False).binary
    m = write_manifest(tmp_path, """
        project: conda
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        conda: torch
        {hook}
        jobs:
          - id: c
            cmd: "echo ran >> ran.txt"
          - id: other
            cmd: "echo other > other.txt"
        """, hook=hook)
    res = ledger("submit", m, "--host", "local", "--no-check")
    run = res.stdout.split("run ", 1)[1].split()[0]
    final = wait_finished(ledger_db, run)
    job = final.jobs["c"]
    assert job.status.value == "stuck" and job.reason == reason
    assert [e.job for e in events(ledger_db, run, ["launch_requested"])] == ["c", "other"]   # one try each
    assert not (tmp_path / "work" / "ran.txt").exists()
    assert final.jobs["other"].status.value == "stuck"       # same conda for every job: same words
    assert reason in ledger("history", "c").stdout


# ---- screen disappears mid-run ---------------------------------------------------------

def _path_without_screen(tmp_path):
    """A PATH (two folders of symlinks) equal to this machine's, where `screen` is one symlink
    that the test can delete and put back, as an admin uninstalling it would."""
    farm, screen_dir = tmp_path / "bin-all", tmp_path / "bin-screen"
    farm.mkdir()
    screen_dir.mkdir()
    for folder in reversed(os.environ.get("PATH", "").split(os.pathsep)):
        if not os.path.isdir(folder) or folder.startswith(str(tmp_path)):
            continue
        for name in os.listdir(folder):
            if name == "screen":
                continue
            link = farm / name
            if os.path.lexists(str(link)):
                link.unlink()
            link.symlink_to(os.path.join(folder, name))
    (screen_dir / "screen").symlink_to(shutil.which("screen"))
    return "%s%s%s" % (screen_dir, os.pathsep, farm), screen_dir / "screen"


def test_screen_vanishing_mid_run_is_a_clear_launch_failure_not_a_crash(tmp_path, ledger_db):
    """screen is removed while jobs wait: the next launch fails with a clear reason and a retry
    time, the scheduler stays up (no crash, no loop of failures), and once screen is back the
    waiting jobs run."""
    path, screen_link = _path_without_screen(tmp_path)
    m = _starts_manifest(tmp_path, "noscreen", 3, 1, 1.0, mem=1000)
    env = dict(os.environ, PATH=path)
    res = ledger("submit", m, "--host", "local", env=env)
    run = res.stdout.split("run ", 1)[1].split()[0]
    wait_event(ledger_db, run, "launched", "j1")
    sched = scheduler_pid(ledger_db)
    target = os.readlink(str(screen_link))
    screen_link.unlink()
    (failed,) = wait_event(ledger_db, run, "launch_failed", "j2", timeout=60)
    assert "screen" in failed.data["reason"] and "No such file" in failed.data["reason"], failed.data
    assert failed.data["retry_at"] and failed.data["delay"] >= 5
    def at_most_once_each():
        jobs = [e.job for e in events(ledger_db, run, ["launch_failed"])]
        return len(jobs) == len(set(jobs))
    holds_for(3.0, lambda: scheduler_pid(ledger_db) == sched and at_most_once_each(),
              what="each waiting job fails once and waits its retry delay; no crash",
              story=lambda: _story(ledger_db)[-3000:])
    screen_link.symlink_to(target)
    final = wait_finished(ledger_db, run, timeout=120)
    assert final.counts()["completed"] == 3
    assert _start_counts(tmp_path, 3) == {"j1": 1, "j2": 1, "j3": 1}
    assert len(events(ledger_db, None, ["scheduler_started"])) == 1


def test_a_scheduler_started_on_a_full_disk_waits_for_space_instead_of_exiting(tmp_path, ledger_db):
    """The scheduler dies and is started again while the ledger's disk is full: it stays up,
    launches nothing and says why; once space is back it records its start and the halt, adopts
    the running job and finishes the run."""
    with tiny_tmpfs(os.path.dirname(ledger_db), size="4m") as folder, _stopped_before_unmount(ledger_db):
        (tmp_path / "gpus").mkdir()
        os.symlink(str(tmp_path / "gpus"), os.path.join(folder, "sim"))
        m = _starts_manifest(tmp_path, "fullstart", 2, 1, 6.0, mem=1000)
        run = submit(m)
        wait_event(ledger_db, run, "launched", "j1")
        kill_scheduler(ledger_db)
        recorded = events(ledger_db)
        import sqlite3
        with closing(sqlite3.connect(ledger_db)) as conn:     # an empty WAL: any append must grow it
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = os.path.join(folder, "filler")
        fill_disk(filler)
        log = open(str(tmp_path / "scheduler.err"), "wb")
        proc = subprocess.Popen([sys.executable, "-m", "ledger.scheduler", "--db", ledger_db], stdout=log,
                                stderr=log, start_new_session=True)
        try:
            from ledger.scheduler import scheduler_note
            note = wait_for(lambda: scheduler_note(ledger_db), timeout=30, what="the scheduler to say why it waits")
            assert "its disk is full" in note and "until space is freed" in note
            res = ledger("status", run, check=False)    # even reading needs room for the -shm file
            assert res.returncode == 1 and "Traceback" not in res.stderr
            (line,) = res.stderr.strip().splitlines()
            assert "its disk is full" in line and "free some space" in line
            holds_for(2.0, lambda: proc.poll() is None
                      and _start_counts(tmp_path, 2) == {"j1": 1, "j2": 0}, what="waiting while full",
                      story=lambda: "poll=%s starts=%s new=%s err=%s" % (
                          proc.poll(), _start_counts(tmp_path, 2), "-",
                          open(str(tmp_path / "scheduler.err")).read()[-2000:]))
            os.unlink(filler)
            final = wait_finished(ledger_db, run)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        assert final.counts()["completed"] == 2
        assert _start_counts(tmp_path, 2) == {"j1": 1, "j2": 1}
        evs = events(ledger_db)
        assert evs[:len(recorded)] == recorded
        later = [e.kind for e in evs[len(recorded):]]
        assert later[0] == "scheduler_started", later
        assert [e.job for e in evs if e.kind == "adopted"] == ["j1"]
        _assert_gap_free(ledger_db)
