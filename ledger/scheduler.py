"""The scheduler loop on a GPU host: observe → decide → append → act.

One scheduler per ledger (an ``flock`` on ``<ledger>.lock``). It replays the ledger
on start, then each tick reads events other writers appended (submit, cancel,
retry, pause), observes the world (the wrappers' pid and exit files, sessions,
GPU memory, outputs, preconditions), asks ``decide`` what happened, appends that
durably, and only then carries out the side effects that follow from the
appended events (start a session, kill one, run a hook, write summary.md). All
effects are idempotent, so a scheduler killed at any moment can be restarted and
converge without launching anything twice.
"""

import fcntl
import glob
import os
import signal
import socket
import subprocess
import sys
import time

from . import __version__, launchers, outcomes
from .decide import (AttemptObs, Config, GpuObs, Observation, decide, expand_home, gpu_claims, is_idle,
                     launch_candidates, phase_gate, MAX_LAUNCH_FAILURES, LAUNCH_RETRY_DELAY)
from .errors import ConflictError, DiskFullError, LaunchError, LedgerError, SchedulerRunning
from .events import Event
from .projection import apply
from .states import ACTIVE, JobStatus

TICK = 0.25              # how often exits are looked for (cheap: a few stat() calls)
GPU_FAST = 0.5           # GPU sampling right after a job left a GPU or launched
GPU_SLOW = 5.0           # ... when nothing changed for a while
GPU_HEALTH = 30.0        # ... when nothing waits for a GPU at all
FAST_WINDOW = 30.0
GPU_DRAIN = TICK         # ... while a GPU our job just left has not been seen free (late release)
DRAIN_WINDOW = 15.0
WIPE_EVERY = 60.0
MAX_FAILED_TICKS = 20    # unexpected errors in a row (with growing pauses, about 80 s) before giving up


def lock_path(db_path):
    return db_path + ".lock"


def scheduler_log_path(db_path):
    return os.path.join(os.path.dirname(db_path), "scheduler.log")


class Lock:
    """The one-scheduler-per-ledger lock: an flock held for the scheduler's life.

    The file holds the holder's pid on its first line and, while launching is halted
    because the ledger cannot be written (disk full), a second line saying why: the lock
    file's block is already allocated, so that note can be written when nothing else can,
    and ``ledger status`` shows it (:func:`scheduler_note`).
    """

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_small(fd)
            os.close(fd)
            raise SchedulerRunning("a scheduler (pid %s) already runs for this ledger; it takes new runs "
                                   "by itself" % (holder or "?"))
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def note(self, text=None):
        """Say (or, with None, stop saying) why launching is halted. Never raises."""
        if self.fd is None:
            return
        body = str(os.getpid()) + ("\nhalted: %s\n" % " ".join(text.split())[:NOTE_MAX] if text else "")
        try:
            os.pwrite(self.fd, body.encode("utf-8", "replace"), 0)
            os.ftruncate(self.fd, len(body.encode("utf-8", "replace")))
        except OSError:
            pass

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


NOTE_MAX = 1000


def _read_small(fd, size=32):
    """The lock file's first line (the holder's pid); the whole text with a bigger ``size``."""
    try:
        os.lseek(fd, 0, 0)
        text = os.read(fd, size).decode("utf-8", "replace")
    except OSError:
        return ""
    return text.strip() if size > 32 else (text.splitlines() or [""])[0].strip()


def scheduler_note(db_path):
    """Why the running scheduler halted launching (disk full), or None."""
    try:
        fd = os.open(lock_path(db_path), os.O_RDONLY)
    except OSError:
        return None
    try:
        for line in _read_small(fd, NOTE_MAX + 100).splitlines()[1:]:
            if line.startswith("halted: "):
                return line[len("halted: "):]
        return None
    finally:
        os.close(fd)


def scheduler_pid(db_path):
    """The pid of the scheduler holding this ledger's lock, or None if none runs."""
    path = lock_path(db_path)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = _read_small(fd)
            return int(holder) if holder.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


JOB_PYTHONPATH = "LEDGER_JOB_PYTHONPATH"


def spawn_detached(db_path, gpu_provider=None):
    """Start a scheduler that outlives this process and its terminal (setsid, no tty)."""
    log = os.open(scheduler_log_path(db_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    entry = os.path.join(root, "run.py")
    if os.environ.get("LEDGER_BUNDLE_KEY") and os.path.exists(entry):
        argv = [sys.executable, entry, "scheduler"]      # `ps` shows which bundle runs
    else:
        argv = [sys.executable, "-m", "ledger.scheduler"]
    argv += ["--db", db_path]
    if gpu_provider:
        argv += ["--gpu-provider", gpu_provider]
    env = dict(os.environ)
    # The scheduler imports ledger (and, from a bundle, its vendored packages) from where
    # this process does; the jobs it launches get the user's own PYTHONPATH back (main()).
    ours = [root] + [p for p in [os.path.join(root, "vendor")] if os.path.isdir(p)]
    user = env.get(JOB_PYTHONPATH, env.get("PYTHONPATH", ""))
    env[JOB_PYTHONPATH] = user
    env["PYTHONPATH"] = os.pathsep.join(ours + [p for p in user.split(os.pathsep) if p])
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                start_new_session=True, close_fds=True, env=env)
    finally:
        os.close(log)
    return proc.pid


class Scheduler:
    """The loop. ``run()`` returns when every run is finished or a signal asks it to stop."""

    def __init__(self, store, provider, provider_spec, tick=TICK, exit_when_idle=True, log=None, lock=None):
        self.store = store
        self.provider = provider
        self.provider_spec = provider_spec
        self.tick = tick
        self.exit_when_idle = exit_when_idle
        self.log = log or _log_line
        self.lock = lock
        self._unrecorded = []       # events that could not be recorded while the disk was full
        ledger_dir = os.path.dirname(os.path.abspath(store.path))
        self.config = Config(control_root=os.path.join(ledger_dir, "runs"), home=os.path.expanduser("~"))
        self.state = None
        self.stop_reason = None
        self.halted = None          # why launching is halted and could not be recorded (disk full)
        self._gpus = None
        self._gpus_at = 0.0
        self._gpu_error = None
        self._last_change = 0.0
        self._last_wipe = 0.0
        self._output_since = {}
        self._gone_since = {}
        self._hooks = []
        self._launchers = {}
        self._adopting = True
        self._last_world_error = None

    # ---- lifecycle ----

    def run(self):
        self.state = self.store.state()
        self._install_signals()
        started = Event(kind="scheduler_started", run="-", data={
            "pid": os.getpid(), "version": __version__, "bundle": os.environ.get("LEDGER_BUNDLE_KEY"),
            "gpu_provider": self.provider_spec,
            "host": socket.gethostname()})
        try:
            self._append([started])
        except DiskFullError as exc:     # started on a full disk: wait for space, launching nothing
            self._unrecorded.append(started)
            self._halt(str(exc))
        self._reconcile_cancelled()
        failures = 0
        while self.stop_reason is None:
            started = time.monotonic()
            try:
                self.step()
                failures = 0
            except DiskFullError as exc:
                self._halt(str(exc))
            except Exception as exc:   # noqa: BLE001 -- a bug must neither kill the queue silently nor spin
                failures += 1
                if not self._recover(exc, failures):
                    break
            if self.exit_when_idle and self._idle():
                if self._stop("idle: every run is finished"):
                    return "idle"
            time.sleep(max(0.0, self.tick - (time.monotonic() - started)))
        self._stop(self.stop_reason, force=True)
        return self.stop_reason

    def _recover(self, exc, failures):
        """An unexpected error in a tick: log it with its traceback, rebuild the state by a
        fresh replay, and go on; after MAX_FAILED_TICKS in a row, stop (recorded, with the
        reason) rather than loop. Returns False when the scheduler should stop."""
        import traceback
        self.log("tick failed (%d in a row): %s\n%s" % (failures, exc, traceback.format_exc().rstrip()))
        if failures >= MAX_FAILED_TICKS:
            self.stop_reason = "stopped after %d failed ticks in a row: %s: %s" % (
                failures, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return False
        time.sleep(min(5.0, 0.5 * failures))
        try:
            self.state = self.store.state()
        except Exception as again:   # noqa: BLE001
            self.log("replay failed too: %s" % again)
        return True

    def _install_signals(self):
        def ask_stop(signum, _frame):
            self.stop_reason = "stopped by %s; running jobs go on" % signal.Signals(signum).name
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                signal.signal(sig, ask_stop)
            except ValueError:
                pass  # not the main thread (tests drive step() directly)

    def _idle(self):
        return is_idle(self.state) and not self._hooks

    def _stop(self, reason, force=False):
        """Record the stop, unless new events arrived meanwhile (a run submitted just now)."""
        ev = Event(kind="scheduler_stopped", run="-", data={"pid": os.getpid(), "reason": reason})
        try:
            self.store.append([ev], expect_last_seq=None if force else self.state.last_seq)
        except ConflictError:
            return False
        except DiskFullError:
            return True
        return True

    # ---- one tick ----

    def step(self):
        """One observe → decide → append → act round."""
        self._catch_up()
        self._poll_hooks()
        self._resume_if_space()
        now = time.time()
        self._wipe_dead_sessions(now)
        obs = self._observe(now)
        events = decide(self.state, obs, self.config)
        self._adopting = False
        if events:
            self._append(events)

    def _catch_up(self):
        """Fold in what other writers appended, and act on it (cancel → kill)."""
        for ev in self.store.read(since_seq=self.state.last_seq):
            apply(self.state, ev)
            self._effect(ev, own=False)

    def _append(self, events):
        """Append with optimistic concurrency on each job's stream; act on what landed."""
        expect = {}
        for ev in events:
            if ev.job is not None and (ev.run, ev.job) not in expect:
                run = self.state.runs.get(ev.run)
                job = run.jobs.get(ev.job) if run else None
                expect[(ev.run, ev.job)] = job.version if job else 0
        try:
            stored = self.store.append(events, expect=expect)
        except ConflictError:
            self._catch_up()   # someone (cancel, retry) got there first: decide again next tick
            return []
        for ev, own in self._fold(stored):
            self._effect(ev, own=own)
        return stored

    def _fold(self, stored):
        """Fold our just-stored events into the state; returns [(event, ours?)] in seq order.

        Another writer (a submit, a cancel of another job) may have appended between our last
        catch-up and our append: everything up to our last event is folded in seq order, as a
        replay would, so that no event of theirs is ever skipped."""
        if not stored:
            return []
        ours = {ev.seq for ev in stored}
        folded = stored
        if stored[0].seq != self.state.last_seq + 1 or len(stored) != stored[-1].seq - stored[0].seq + 1:
            folded = list(self.store.read(since_seq=self.state.last_seq, until_seq=stored[-1].seq))
        for ev in folded:
            apply(self.state, ev)
        return [(ev, ev.seq in ours) for ev in folded]

    # ---- observing ----

    def _observe(self, now):
        attempts = {}
        sessions = {}
        for run in self.state.runs.values():
            if run.finished:
                continue
            plan = run.plan_obj
            for job in run.jobs.values():
                if job.status in ACTIVE:
                    attempts[(run.id, job.id)] = self._observe_attempt(run, plan, job, now, sessions)
        self._sample_gpus(now)
        return Observation(now=now, gpus=self._gpus, gpu_error=self._gpu_error, gpus_taken_at=self._gpus_at,
                           attempts=attempts, preconditions=self._preconditions(),
                           adopting=self._adopting, launching_allowed=self.halted is None)

    def _observe_attempt(self, run, plan, job, now, sessions):
        a = job.current
        files = launchers.control_paths(os.path.join(self.config.control_root, run.id), job.id, job.attempt)
        pid = launchers.read_pid(files)
        ex = launchers.read_exit(files)
        alive = bool(pid) and launchers.process_alive(pid)
        key = (run.id, job.id, job.attempt)
        gone = None
        if ex is None and not alive and (pid or job.status == JobStatus.LAUNCHING):
            gone = self._gone_since.setdefault(key, now)
        else:
            self._gone_since.pop(key, None)
        session_alive = None
        if ex is None and not alive and a.session:
            if a.session not in sessions:
                sessions[a.session] = self._session_alive(plan, a.session)
            session_alive = sessions[a.session]
        spec = plan.job(job.id)
        outputs = ()
        if spec.output_check and (ex is not None or alive or gone is not None):
            outputs, fresh = self._outputs(plan, spec, a.requested_at)
            if fresh:   # only this attempt's own output starts the linger clock
                self._output_since.setdefault(key, now)
        tail = ""
        if ex is not None or (gone is not None and session_alive is False):
            tail = outcomes.read_tail(a.log) if a.log else ""
        return AttemptObs(pid=pid, pid_alive=alive, exit=ex, session_alive=session_alive, outputs=outputs,
                          output_since=self._output_since.get(key), log_tail=tail, gone_since=gone)

    def _session_alive(self, plan, session):
        """Whether the session lives; None (not known: decide waits) when the launcher itself
        cannot be asked (screen uninstalled mid-run, tmux server hung)."""
        try:
            return self._launcher(plan).alive(session)
        except LaunchError as exc:
            self._world_error("cannot look at session %s: %s" % (session, exc))
            return None

    def _world_error(self, message):
        """A launcher or tool failing is the world's fault, not a bug: log it once (until it
        changes) and carry on; the events that matter (launch_failed, ...) say it for the user."""
        if message != self._last_world_error:
            self._last_world_error = message
            self.log(message)

    def _outputs(self, plan, spec, since):
        """(every file the output check matches, whether one of them was written by this
        attempt). A file left by an earlier run or attempt satisfies the check of a job that
        exits 0, but never makes a running job look finished: only a file modified after the
        attempt was requested starts the linger grace (no slack: a clock or mtime that is off
        can only spare a lingering job, never kill a working one)."""
        root = expand_home(plan.cwd, self.config.home)
        paths = sorted(glob.glob(os.path.join(root, spec.output_check)))[:50]
        fresh = False
        for path in paths:
            try:
                fresh = fresh or since is None or os.stat(path).st_mtime >= since
            except OSError:
                pass
        return tuple(os.path.relpath(p, root) for p in paths), fresh

    def _preconditions(self):
        """For jobs whose phase may start: None if their preconditions hold, else why not."""
        out = {}
        for run in self.state.runs.values():
            if run.finished or run.cancelled:
                continue
            plan = run.plan_obj
            gate = phase_gate(run, plan)
            root = expand_home(plan.cwd, self.config.home)
            for job in run.jobs.values():
                if job.status not in (JobStatus.PENDING, JobStatus.BLOCKED) or gate.get(job.phase) is not None:
                    continue
                out[(run.id, job.id)] = _check_preconditions(plan.job(job.id), root)
        return out

    def _sample_gpus(self, now):
        """Read GPU memory at a rate that follows need: fast right after a GPU changed
        hands while work waits, slow otherwise, and never when every GPU is ours."""
        waiting = any(launch_candidates(r, r.plan_obj) for r in self.state.runs.values() if not r.finished)
        if self._gpus is None:
            interval = 0.0
        elif not waiting:
            interval = GPU_HEALTH
        elif self._all_gpus_held():
            interval = GPU_HEALTH
        else:
            interval = GPU_FAST if now - self._last_change < FAST_WINDOW else GPU_SLOW
            if interval > GPU_DRAIN and self._draining(now):
                interval = GPU_DRAIN
        if now - self._gpus_at < interval - 0.5 * self.tick:    # half a tick of slack: ticks jitter
            return
        taken_at = time.time()
        snap = self.provider.read()
        self._gpus_at = taken_at
        self._gpu_error = snap.error
        if snap.error is None:
            self._gpus = {i: GpuObs(index=i, uuid=g.uuid, used_mib=g.used_mib, total_mib=g.total_mib,
                                    error=g.error) for i, g in snap.gpus.items()}
        else:
            self._gpus = {}

    def _draining(self, now):
        """True while a GPU one of our jobs left less than DRAIN_WINDOW ago has not been seen
        free since (its memory is released late): work waits for it, so it is read every
        tick and the next job starts within a tick of the release."""
        if not self._gpus:
            return False
        held, left_at = gpu_claims(self.state, since=now - DRAIN_WINDOW)
        thresholds = [r.plan_obj.gpu_free_threshold_mib for r in self.state.runs.values() if not r.finished]
        threshold = min(thresholds) if thresholds else None
        for g, left in left_at.items():
            seen = self._gpus.get(g)
            if now - left >= DRAIN_WINDOW or g in held or seen is None:
                continue
            if self._gpus_at <= left or seen.used_mib is None or (threshold is not None and seen.used_mib >= threshold):
                return True
        return False

    def _all_gpus_held(self):
        return bool(self._gpus) and set(self._gpus) <= gpu_claims(self.state, since=self._gpus_at)[0]

    # ---- acting on events ----

    def _effect(self, ev, own):
        """The side effect an appended event calls for. Idempotent."""
        if ev.kind == "launch_requested" and own:
            self._start(ev)
        elif ev.kind in ("cancelled", "timed_out", "stale_cleaned"):
            self._kill(ev)
        elif ev.kind == "stuck" and own:
            self._hook(ev.run, "on_stuck", ev.job, ev.data.get("reason"))
        elif ev.kind == "run_finished" and own:
            self._finish(ev.run)
        elif ev.kind == "sessions_wiped" and own:
            try:
                self._launcher_named(ev.data["launcher"]).wipe()
            except LaunchError as exc:
                self._world_error("cannot wipe %s sessions: %s" % (ev.data["launcher"], exc))
        if ev.kind in ("launch_requested", "exited", "cancelled", "launch_lost", "launched"):
            self._last_change = time.time()
        if ev.kind == "exited":
            self._last_wipe = 0.0     # a session just ended: look for a dead one on the next tick

    def _launcher(self, plan):
        return self._launcher_named(plan.launcher or "screen")

    def _launcher_named(self, name):
        if name not in self._launchers:
            self._launchers[name] = launchers.get_launcher(name)
        return self._launchers[name]

    def _wipe_dead_sessions(self, now):
        """Now and then, record and wipe our sessions whose server died ("Dead ???" in
        ``screen -ls``): they hold nothing, but confuse a human reading the list."""
        if now - self._last_wipe < WIPE_EVERY:
            return
        self._last_wipe = now
        for name, launcher in sorted(self._launchers.items()):
            try:
                dead = launcher.dead_sessions() if hasattr(launcher, "dead_sessions") else ()
            except LaunchError as exc:
                self._world_error("cannot list %s sessions: %s" % (name, exc))
                continue
            if dead:
                self._append([Event(kind="sessions_wiped", run="-",
                                    data={"launcher": name, "sessions": sorted(dead)})])

    def _start(self, ev):
        run = self.state.runs[ev.run]
        plan = run.plan_obj
        spec = plan.job(ev.job)
        prefixes = self.provider.job_path_prefixes() if hasattr(self.provider, "job_path_prefixes") else {}
        req = launchers.LaunchRequest(
            run=ev.run, job=ev.job, attempt=ev.attempt, cmd=spec.cmd,
            cwd=expand_home(plan.cwd, self.config.home), gpus=tuple(ev.data["gpus"]), env=dict(spec.env),
            conda_env=plan.conda, conda_hook=plan.conda_hook, control_dir=ev.data["control"],
            log_path=ev.data["log"], path_prefix=_as_tuple(prefixes.get("PATH")),
            pythonpath_prefix=_as_tuple(prefixes.get("PYTHONPATH")),
            extra_env=dict(self.provider.job_env()))
        try:
            files = launchers.write_wrapper(req)
            self._launcher(plan).start(ev.data["session"], files, req.cwd)
        except (LaunchError, OSError) as exc:
            self._launch_failed(run, ev, exc)

    def _launch_failed(self, run, ev, exc):
        job = run.jobs[ev.job]
        reason = "launch failed: %s" % (str(exc).splitlines() or ["?"])[0]
        self.log("%s/%s: %s" % (ev.run, ev.job, reason))
        events = [Event(kind="launch_failed", run=ev.run, job=ev.job, attempt=ev.attempt,
                        data={"reason": reason, "retry_at": time.time() + LAUNCH_RETRY_DELAY,
                              "delay": LAUNCH_RETRY_DELAY})]
        if job.failures + 1 >= MAX_LAUNCH_FAILURES:
            events[0].data["retry_at"] = None
            events.append(Event(kind="stuck", run=ev.run, job=ev.job, attempt=ev.attempt,
                                data={"reason": reason}))
        self._append(events)

    def _kill(self, ev):
        run = self.state.runs.get(ev.run)
        job = run.jobs.get(ev.job) if run else None
        if job is None or not job.attempts:
            return
        a = job.attempts[-1]
        pid = ev.data.get("pid") or a.pid
        if not pid:
            files = launchers.control_paths(os.path.join(self.config.control_root, ev.run), ev.job, a.number)
            pid = launchers.read_pid(files)
        if pid and launchers.process_alive(pid):
            launchers.kill_group(pid, grace=5.0)
        if ev.kind == "cancelled" and a.session:
            try:
                self._launcher(run.plan_obj).kill(a.session)
            except LaunchError:
                pass

    def _reconcile_cancelled(self):
        """On start, make sure cancelled jobs' sessions are really gone (a kill may have been missed)."""
        for run in self.state.runs.values():
            for job in run.jobs.values():
                if job.status == JobStatus.CANCELLED and job.attempts and job.attempts[-1].session:
                    self._kill(Event(kind="cancelled", run=run.id, job=job.id))

    def _finish(self, run_id):
        """summary.md by replay, then the on_complete hook."""
        from .summary import render_summary
        run = self.state.runs[run_id]
        plan = run.plan_obj
        root = expand_home(plan.cwd, self.config.home)
        path = os.path.join(root, "experiment_queue", run_id, "summary.md")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = "%s.tmp-%d" % (path, os.getpid())
            with open(tmp, "w") as f:          # whole or not at all, for whoever reads it
                f.write(render_summary(self.state, run_id))
            os.replace(tmp, path)
            self._append([Event(kind="summary_written", run=run_id, data={"path": path})])
        except OSError as exc:
            self.log("%s: could not write summary.md: %s" % (run_id, exc))
        self._hook(run_id, "on_complete", None, None)

    def _hook(self, run_id, name, job_id, reason):
        plan = self.state.runs[run_id].plan_obj
        cmd = getattr(plan, name)
        if not cmd:
            return
        env = dict(os.environ, LEDGER_RUN=run_id, LEDGER_JOB=job_id or "", LEDGER_REASON=reason or "",
                   LEDGER_HOOK=name)
        cwd = expand_home(plan.cwd, self.config.home)
        try:
            proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd if os.path.isdir(cwd) else "/", env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self.log("%s: hook %s could not start: %s" % (run_id, name, exc))
            return
        self._hooks.append((proc, run_id, name, job_id, time.time()))

    def _poll_hooks(self):
        still = []
        for proc, run_id, name, job_id, started in self._hooks:
            code = proc.poll()
            if code is None and time.time() - started < 300:
                still.append((proc, run_id, name, job_id, started))
                continue
            if code is None:
                launchers.kill_group(proc.pid, grace=1.0)
                code = -9
            self._append([Event(kind="hook_ran", run=run_id, data={"hook": name, "exit_code": code,
                                                                   "job": job_id})])
        self._hooks = still

    # ---- disk full ----

    def _halt(self, reason):
        if self.halted is None:
            self.log("launching halted: %s" % reason)
            self.halted = (reason, time.time())
            if self.lock is not None:
                self.lock.note("%s; launching nothing until space is freed (since %s)"
                               % (reason, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))

    def _resume_if_space(self):
        if self.halted is None:
            return
        reason, since = self.halted
        events = [Event(kind="launching_halted", run="-", data={"reason": reason, "since": since}),
                  Event(kind="launching_resumed", run="-", data={"reason": "the ledger can be written again"})]
        stored = self.store.append(self._unrecorded + events)   # DiskFullError propagates: still full
        self._unrecorded = []
        for ev, own in self._fold(stored):
            if not own:
                self._effect(ev, own=False)
        self.halted = None
        if self.lock is not None:
            self.lock.note(None)
        self.log("launching resumed: the ledger can be written again")


def _log_line(msg):
    """The scheduler's own log (stderr, usually scheduler.log beside the ledger). A full disk
    must not kill the scheduler through its log: a line that cannot be written is dropped."""
    try:
        print(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _as_tuple(value):
    if not value:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _check_preconditions(spec, root):
    from .preflight import unmet_preconditions
    unmet = unmet_preconditions(spec, root)
    return "precondition checkpoint_exists: %s not found" % unmet[0]["path"] if unmet else None


def main(argv=None):
    """Entry point of the detached scheduler process (``python -m ledger.scheduler``)."""
    import argparse
    from .gpus import provider_from_spec
    from .store import open_store
    parser = argparse.ArgumentParser(prog="ledger-scheduler")
    parser.add_argument("--db", required=True)
    parser.add_argument("--gpu-provider", default=None)
    parser.add_argument("--tick", type=float, default=TICK)
    args = parser.parse_args(argv)
    _restore_job_pythonpath(os.environ)
    from .localdisk import ledger_path
    try:
        args.db = ledger_path(args.db, note=_log_line)     # never lock or write a ledger on NFS/FUSE
    except LedgerError as exc:
        _log_line("ledger scheduler: %s" % exc)
        return exc.exit_code
    try:
        lock = Lock(lock_path(args.db)).acquire()
    except SchedulerRunning as exc:
        _log_line("ledger scheduler: %s" % exc)
        return 3
    try:
        store = _open_when_space(open_store, args.db, lock)
        if store is None:
            return 0
        spec = args.gpu_provider or _provider_of_unfinished_runs(store)
        provider = provider_from_spec(spec, os.path.dirname(os.path.abspath(args.db)))
        reason = Scheduler(store, provider, spec or "nvidia-smi", tick=args.tick, lock=lock).run()
        _log_line("ledger scheduler: %s" % reason)
        return 0
    except LedgerError as exc:
        _log_line("ledger scheduler: %s" % exc)
        return exc.exit_code
    finally:
        lock.release()


OPEN_RETRY = 2.0


def _open_when_space(open_store, db, lock):
    """Open the ledger; on a disk too full even to open it, say so (lock file, log) and wait for
    space instead of exiting, since nobody would start the scheduler again. None if stopped."""
    stop = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda signum, _frame: stop.append(signum))
    try:
        said = False
        while True:
            try:
                return open_store(db)
            except DiskFullError as exc:
                if not said:
                    _log_line("launching halted: %s" % exc)
                    lock.note("%s; launching nothing until space is freed" % exc)
                    said = True
            if stop:
                return None
            time.sleep(OPEN_RETRY)
            if stop:
                return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.note(None)


def _restore_job_pythonpath(environ):
    """Jobs (which inherit this environment) must not import ledger's own copies."""
    if JOB_PYTHONPATH not in environ:
        return
    user = environ.pop(JOB_PYTHONPATH)
    if user:
        environ["PYTHONPATH"] = user
    else:
        environ.pop("PYTHONPATH", None)


def _provider_of_unfinished_runs(store):
    state = store.state()
    for run in sorted(state.runs.values(), key=lambda r: r.submitted_at):
        if not run.finished and run.plan.get("gpu_provider"):
            return run.plan["gpu_provider"]
    return None


if __name__ == "__main__":
    sys.exit(main())
