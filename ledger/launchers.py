"""Start, watch and stop one attempt of a job in a named, detached session.

Every attempt runs a small bash *wrapper* (written by :func:`write_wrapper`) inside a
session a user can attach to (``screen -r ledger.<run>.<job>.a<n>``). The wrapper is
the only thing that sees the job start and end, so it records the facts the scheduler
needs and cannot observe later: the job's own pid (the process group leader) before
it waits, and the exact exit code or killing signal after, each written atomically
(tmp file + rename) into the run's control folder.

Launchers are deliberately tiny (start / sessions / alive / kill / wipe) so that a
new backend (tmux, a bare process group, later Slurm) is one class, not a rewrite.

This module runs on the GPU host: standard library only, Python 3.9.

Choices worth knowing
---------------------
* Output: the job appends stdout+stderr straight to its log file; inside a screen or
  tmux the wrapper shows the log with ``tail -f`` from the byte offset where the job
  started. No ``tee`` sits between the job and its log, so a dying viewer can neither
  mask the exit code nor SIGPIPE the job. The job's stdin is ``/dev/null``: it runs as
  a background process group and would otherwise stop on SIGTTIN.
* ``exit 137`` versus SIGKILL: bash's ``wait`` reports both as 137. The wrapper keeps a
  SIGCHLD trap that appends ``jobs -l`` (a builtin, no fork) to a scratch file; that
  listing says ``Exit 137`` for the former and ``Killed`` for the latter. If the
  listing is missing, a status above 128 is taken to mean "killed by signal status-128".
* Killing: the wrapper forwards SIGTERM, SIGHUP and SIGINT to the job's process group
  and, if the group is still there ``kill_grace`` seconds later, sends SIGKILL. Closing
  a screen or tmux session (SIGHUP) or SIGTERM-ing a process launcher's wrapper
  therefore takes the whole job down. The session disappears at once; the job may
  live up to ``kill_grace`` longer (watch :func:`read_exit`).
* Process launcher bookkeeping: there is no session server to ask, so ``start`` writes
  ``<job>.<attempt>.wpid`` (session name, wrapper pid, its start time in clock ticks)
  next to the wrapper script. ``sessions()``/``alive()``/``kill()`` scan the control
  folders the launcher was given (``ProcessLauncher(control_dirs=...)`` or
  ``sessions(control_dirs=...)``) plus every folder it started something in.
* tmux forbids ``.`` and ``:`` in session names, so the tmux session is named with
  ``_`` instead and carries the ledger name in the user option ``@ledger_session``;
  ``sessions()`` reports the ledger names.
* Session names are at most 72 characters so that screen's ``-S <pid>.<name>`` (which
  screen caps at 80) can address one session exactly.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

from ledger.errors import LaunchError
from ledger.names import SESSION_NAME_MAX, SESSION_PREFIX, session_name  # noqa: F401 (re-exported)

DEFAULT_KILL_GRACE = 10.0
KILL_SETTLE = 2.0  # how long kill_group waits for a SIGKILLed group to vanish

# Usual install places of conda, tried in this order when neither the manifest nor
# LEDGER_CONDA_HOOK says where conda is. "~/" means the home folder on the GPU host.
CONDA_CANDIDATES = (
    "~/miniconda3/bin/conda",
    "~/anaconda3/bin/conda",
    "~/miniforge3/bin/conda",
    "~/mambaforge/bin/conda",
    "/opt/conda/bin/conda",
    "/opt/miniconda3/bin/conda",
)

_SESSION_OK = re.compile(r"[A-Za-z0-9_.+-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A conda hook with any of these is shell text to eval; otherwise it is a path to conda.
# The wrapper's bash `case` pattern below mirrors this set.
_SHELL_TEXT = re.compile(r"[\s;&|()<>$`\"']")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LaunchRequest:
    """Everything needed to run one attempt; built by the scheduler from the plan."""

    run: str
    job: str
    attempt: int
    cmd: str
    cwd: str
    gpus: Tuple[int, ...]
    env: Dict[str, str]
    conda_env: Optional[str]
    conda_hook: Optional[str]
    control_dir: str
    log_path: str
    path_prefix: Tuple[str, ...] = ()
    pythonpath_prefix: Tuple[str, ...] = ()
    extra_env: Dict[str, str] = field(default_factory=dict)
    kill_grace: float = DEFAULT_KILL_GRACE


@dataclass(frozen=True)
class AttemptFiles:
    """The control files of one attempt, all inside the run's control folder."""

    control_dir: str
    script: str
    pid: str
    exit: str
    wpid: str

    @property
    def scratch_prefix(self):
        """Stem for the wrapper's own scratch files (conda errors, job listings)."""
        return self.script[: -len(".sh")]


# --------------------------------------------------------------------------- names


def control_paths(control_dir, job, attempt):
    """The attempt's control file paths: ``<job>.<attempt>.sh/.pid/.exit/.wpid``."""
    job = str(job)
    if not job or "/" in job or "\0" in job or job in (".", ".."):
        raise LaunchError("job id {!r} cannot be used as a file name".format(job))
    stem = os.path.join(os.path.expanduser(control_dir), "{}.{}".format(job, int(attempt)))
    return AttemptFiles(
        control_dir=os.path.expanduser(control_dir),
        script=stem + ".sh",
        pid=stem + ".pid",
        exit=stem + ".exit",
        wpid=stem + ".wpid",
    )


# --------------------------------------------------------------------------- conda


def _expand_home(path, home):
    if path == "~":
        return home
    if path.startswith("~/"):
        return os.path.join(home, path[2:])
    return path


def _is_shell_text(hook):
    return bool(_SHELL_TEXT.search(hook))


def _hook_for_binary(path):
    return 'eval "$({} shell.bash hook)"'.format(shlex.quote(path))


def _is_executable_file(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _hook_from_setting(setting, home):
    """Shell text for a manifest/env hook setting; None for a conda path that is absent."""
    setting = setting.strip()
    if _is_shell_text(setting):
        return setting
    path = _expand_home(setting, home)
    return _hook_for_binary(path) if _is_executable_file(path) else None


def resolve_conda_hook(manifest_hook, environ, home):
    """The shell text that makes ``conda activate`` work on this host, or None.

    Python twin of the wrapper's run-time search (used by ``ledger check``): the
    manifest's ``conda_hook`` (a conda path or full shell text), else
    ``LEDGER_CONDA_HOOK``, else the usual install paths, else ``conda`` on PATH.
    """
    for setting in (manifest_hook, environ.get("LEDGER_CONDA_HOOK")):
        if setting and setting.strip():
            return _hook_from_setting(setting, home)
    for candidate in CONDA_CANDIDATES:
        path = _expand_home(candidate, home)
        if _is_executable_file(path):
            return _hook_for_binary(path)
    found = shutil.which("conda", path=environ.get("PATH", os.defpath))
    return _hook_for_binary(found) if found else None


def _manifest_hook_text(hook):
    """Render the manifest hook at write time; '' lets the wrapper search at run time."""
    if not hook or not hook.strip():
        return ""
    hook = hook.strip()
    if _is_shell_text(hook):
        return hook
    return _hook_for_binary(os.path.expanduser(hook))


# --------------------------------------------------------------------------- wrapper

_q = shlex.quote


def _check_text(what, value):
    if "\0" in value:
        raise LaunchError("{} contains a NUL byte, which a shell cannot pass on".format(what))
    return value


def _check_env(job, env, what):
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(str(name)):
            raise LaunchError(
                "job {}: {} name {!r} is not a valid shell variable name".format(job, what, name)
            )
        if str(name).startswith("_lw_"):
            raise LaunchError("job {}: {} name {!r} is reserved for the ledger wrapper".format(job, what, name))
        _check_text("job {}: {} {}".format(job, what, name), str(value))


def substitute_reserved(cmd, gpus, run, attempt):
    """Replace ``${GPU}``, ``${RUN_ID}`` and ``${ATTEMPT}`` literally (plain text)."""
    return (
        cmd.replace("${GPU}", ",".join(str(int(g)) for g in gpus))
        .replace("${RUN_ID}", str(run))
        .replace("${ATTEMPT}", str(int(attempt)))
    )


def _render_candidates():
    words = []
    for candidate in CONDA_CANDIDATES:
        if candidate.startswith("~/"):
            words.append('"$HOME"/' + _q(candidate[2:]))
        else:
            words.append(_q(candidate))
    return " ".join(words)


def _render_exports(req):
    """``export`` lines, in precedence order: job env, then ledger's own, then prefixes."""
    lines = ["export {}={}".format(k, _q(str(v))) for k, v in req.env.items()]
    gpus = ",".join(str(int(g)) for g in req.gpus)
    lines += [
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "export CUDA_VISIBLE_DEVICES={}".format(_q(gpus)),
        "export LEDGER_RUN={}".format(_q(req.run)),
        "export LEDGER_JOB={}".format(_q(req.job)),
        "export LEDGER_ATTEMPT={}".format(int(req.attempt)),
    ]
    lines += ["export {}={}".format(k, _q(str(v))) for k, v in req.extra_env.items()]
    if req.path_prefix:
        joined = ":".join(_q(os.path.expanduser(p)) for p in req.path_prefix)
        lines.append('export PATH={}"${{PATH:+:$PATH}}"'.format(joined))
    if req.pythonpath_prefix:
        joined = ":".join(_q(os.path.expanduser(p)) for p in req.pythonpath_prefix)
        lines.append('export PYTHONPATH={}"${{PYTHONPATH:+:$PYTHONPATH}}"'.format(joined))
    return "\n".join(lines)


# The static parts of the wrapper. No user text is ever pasted here: user values live
# only in the quoted `_lw_*=` assignments and `export` lines rendered by Python.
_WRAPPER_FUNCTIONS = r"""
_lw_pid=
_lw_got=
_lw_killer=
_lw_tail=
_lw_interrupted=0
_lw_started_at=
_lw_reason=

_lw_now() {
    _lw_t=${EPOCHREALTIME:-}
    if [ -n "$_lw_t" ]; then _lw_t=${_lw_t/,/.}; return; fi
    _lw_t=$(date +%s.%N 2>/dev/null)
    case $_lw_t in ''|*[!0-9.]*) _lw_t=$(date +%s) ;; esac
}

_lw_json_string() {
    local s
    s=$(printf '%s' "$1" | tr '\001-\037\177' ' ')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    _lw_j="\"$s\""
}

_lw_write_exit() {
    local tmp="$_lw_exitf.tmp.$$" reason=null
    if [ -n "$3" ]; then _lw_json_string "$3"; reason=$_lw_j; fi
    _lw_now
    printf '{"exit_code": %s, "signal": %s, "started_at": %s, "ended_at": %s, "reason": %s, "pid": %s, "wrapper_pid": %s}\n' \
        "$1" "$2" "${_lw_started_at:-$_lw_t}" "$_lw_t" "$reason" "${_lw_pid:-null}" "$$" \
        > "$tmp" && mv -f -- "$tmp" "$_lw_exitf"
}

_lw_give_up() {
    printf 'ledger: %s\n' "$1" >&2
    _lw_write_exit null null "$1"
    exit 1
}

_lw_on_signal() {
    _lw_got=$1
    _lw_interrupted=1
    [ -n "$_lw_pid" ] || return 0
    kill -s "$1" -- "-$_lw_pid" 2>/dev/null
    if [ -z "$_lw_killer" ]; then
        ( trap - TERM HUP INT; sleep "$_lw_grace"; kill -s KILL -- "-$_lw_pid" ) </dev/null >/dev/null 2>&1 &
        _lw_killer=$!
    fi
}

_lw_conda_hook_text() {
    local h c
    _lw_h=$_lw_conda_hook
    [ -z "$_lw_h" ] || return 0
    h=${LEDGER_CONDA_HOOK:-}
    if [ -n "$h" ]; then
        case $h in
            *[[:space:]\;\&\|\(\)\<\>\$\`\"\']*) _lw_h=$h; return 0 ;;
            "~/"*) h=$HOME/${h#"~/"} ;;
        esac
        _lw_h="eval \"\$($(printf '%q' "$h") shell.bash hook)\""
        return 0
    fi
    for c in "${_lw_conda_candidates[@]}"; do
        if [ -f "$c" ] && [ -x "$c" ]; then
            _lw_h="eval \"\$($(printf '%q' "$c") shell.bash hook)\""
            return 0
        fi
    done
    c=$(type -P conda 2>/dev/null)
    if [ -n "$c" ]; then _lw_h="eval \"\$($(printf '%q' "$c") shell.bash hook)\""; fi
    return 0
}

_lw_activate_conda() {
    local errf="$_lw_scratch.conda.err" st first
    _lw_conda_hook_text
    {
        if [ -n "$_lw_h" ]; then eval "$_lw_h"; fi
        conda activate "$_lw_conda_env"
    } >>"$_lw_log" 2>"$errf"
    st=$?
    if [ "$st" -eq 0 ]; then rm -f -- "$errf"; return 0; fi
    first=$(grep -v '^[[:space:]]*$' "$errf" 2>/dev/null | head -n 1 | sed -e 's/^.*: line [0-9][0-9]*: //')
    [ -n "$first" ] || first="conda activate exited with status $st"
    cat -- "$errf" >> "$_lw_log" 2>/dev/null
    rm -f -- "$errf"
    _lw_reason="conda activation failed: ${first:0:300}"
    printf 'ledger: %s\n' "$_lw_reason" >> "$_lw_log"
    return 1
}

trap '_lw_on_signal TERM' TERM
trap '_lw_on_signal HUP' HUP
trap '_lw_on_signal INT' INT

_lw_now
_lw_started_at=$_lw_t
cd -- "$_lw_cwd" 2>/dev/null || _lw_give_up "cwd not found: $_lw_cwd"
mkdir -p -- "$_lw_logdir" 2>/dev/null && : >> "$_lw_log" 2>/dev/null \
    || _lw_give_up "log file cannot be written: $_lw_log"
if [ -n "$_lw_conda_env" ]; then
    _lw_activate_conda || _lw_give_up "$_lw_reason"
fi
# The control files (pid, exit, scratch) are private; the job gets the user's umask back.
_lw_umask=$(umask)
umask 077
"""

_WRAPPER_RUN = r"""
[ -z "$_lw_got" ] || _lw_give_up "cancelled by SIG$_lw_got before the job started"

set -m
_lw_jobsf="$_lw_scratch.jobs"
: > "$_lw_jobsf"
trap 'jobs -l >> "$_lw_jobsf" 2>/dev/null' CHLD
if [ -t 1 ]; then
    _lw_size=$(wc -c < "$_lw_log" 2>/dev/null)
    tail -c +$(( ${_lw_size:-0} + 1 )) -f -- "$_lw_log" </dev/null 2>/dev/null &
    _lw_tail=$!
fi

_lw_now
_lw_started_at=$_lw_t
( umask "$_lw_umask"; exec "$_lw_bash" -c "$_lw_cmd" ) </dev/null >>"$_lw_log" 2>&1 &
_lw_pid=$!
printf '%s\n' "$_lw_pid" > "$_lw_pidf.tmp" && mv -f -- "$_lw_pidf.tmp" "$_lw_pidf"
[ -z "$_lw_got" ] || _lw_on_signal "$_lw_got"

while :; do
    _lw_interrupted=0
    wait "$_lw_pid"
    _lw_st=$?
    kill -0 "$_lw_pid" 2>/dev/null || break
    # Still there: a forwarded signal interrupted `wait`, or the job is stopped.
    [ "$_lw_interrupted" = 1 ] || sleep 1
done
wait "$_lw_pid" 2>/dev/null
_lw_again=$?
[ "$_lw_again" -eq 127 ] || _lw_st=$_lw_again
trap - CHLD

[ -z "$_lw_killer" ] || kill -s KILL -- "-$_lw_killer" 2>/dev/null
[ -z "$_lw_tail" ] || kill -- "-$_lw_tail" 2>/dev/null

_lw_code=$_lw_st
_lw_sig=null
if [ "$_lw_st" -gt 128 ] && [ "$_lw_st" -le 192 ]; then
    _lw_line=$(grep -F -- " $_lw_pid " "$_lw_jobsf" 2>/dev/null | tail -n 1)
    _lw_rest=${_lw_line#*" $_lw_pid "}
    case " $_lw_rest " in
        *" $_lw_st "*) ;;
        *) _lw_code=null; _lw_sig=$(( _lw_st - 128 )) ;;
    esac
fi
rm -f -- "$_lw_jobsf"
[ -z "$_lw_got" ] || _lw_reason="wrapper received SIG$_lw_got"
_lw_write_exit "$_lw_code" "$_lw_sig" "$_lw_reason"
exit "$_lw_st"
"""


def build_wrapper(req, files=None):
    """The wrapper script text for ``req`` (see the module docstring for what it does)."""
    files = files or control_paths(req.control_dir, req.job, req.attempt)
    _check_env(req.job, req.env, "env")
    _check_env(req.job, req.extra_env, "extra_env")
    cmd = _check_text("job {} cmd".format(req.job), substitute_reserved(req.cmd, req.gpus, req.run, req.attempt))
    cwd = _check_text("job {} cwd".format(req.job), os.path.expanduser(req.cwd))
    log = _check_text("job {} log path".format(req.job), os.path.expanduser(req.log_path))
    conda_env = _check_text("job {} conda env".format(req.job), req.conda_env or "")
    hook = _check_text("job {} conda_hook".format(req.job), _manifest_hook_text(req.conda_hook))
    for part in tuple(req.path_prefix) + tuple(req.pythonpath_prefix):
        _check_text("job {} path prefix".format(req.job), part)
    header = [
        "#!/usr/bin/env bash",
        "# ledger attempt wrapper (generated; every value below is shell-quoted)",
        "_lw_run={}".format(_q(str(req.run))),
        "_lw_job={}".format(_q(str(req.job))),
        "_lw_attempt={}".format(int(req.attempt)),
        "_lw_cwd={}".format(_q(cwd)),
        "_lw_log={}".format(_q(log)),
        "_lw_logdir={}".format(_q(os.path.dirname(log) or ".")),
        "_lw_pidf={}".format(_q(files.pid)),
        "_lw_exitf={}".format(_q(files.exit)),
        "_lw_scratch={}".format(_q(files.scratch_prefix)),
        "_lw_cmd={}".format(_q(cmd)),
        "_lw_conda_env={}".format(_q(conda_env)),
        "_lw_conda_hook={}".format(_q(hook)),
        "_lw_grace={}".format(_q("{:g}".format(float(req.kill_grace)))),
        "_lw_conda_candidates=({})".format(_render_candidates()),
        "_lw_bash=$BASH",
    ]
    return "\n".join(header + [_WRAPPER_FUNCTIONS, _render_exports(req), _WRAPPER_RUN])


def _atomic_write(path, data, mode):
    tmp = "{}.tmp.{}".format(path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _make_private_dir(path):
    from ledger.localdisk import make_private_dirs
    make_private_dirs(path)        # the run's folder and any parent it creates (runs/) are 0700
    os.chmod(path, 0o700)


def write_wrapper(req):
    """Write the attempt's wrapper script (0700) into ``control_dir`` (0700).

    Stale ``.pid``/``.exit`` files of the same attempt are left alone: if the same
    attempt is launched again the caller must have checked them first.
    """
    files = control_paths(req.control_dir, req.job, req.attempt)
    text = build_wrapper(req, files)
    try:
        _make_private_dir(files.control_dir)
        _atomic_write(files.script, text.encode("utf-8", "surrogateescape"), 0o700)
    except OSError as exc:
        raise LaunchError("cannot write wrapper {}: {}".format(files.script, exc.strerror or exc))
    return files


# --------------------------------------------------------------------------- control files


def read_pid(files):
    """The job's own pid (its process group leader), or None before it started."""
    try:
        with open(files.pid, "r", encoding="ascii", errors="replace") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


_EXIT_KEYS = ("exit_code", "signal", "started_at", "ended_at", "reason")


def read_exit(files):
    """The attempt's end record, or None while it is still running.

    Keys: exit_code (int or None), signal (int or None), started_at, ended_at (epoch
    floats), reason (str or None), plus pid and wrapper_pid when known.
    """
    try:
        with open(files.exit, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw.decode("utf-8", "replace"))
    except ValueError as exc:
        raise LaunchError("exit file {} is unreadable: {}".format(files.exit, exc))
    for key in _EXIT_KEYS:
        record.setdefault(key, None)
    return record


# --------------------------------------------------------------------------- processes


def _proc_stat_fields(pid):
    """Fields of /proc/<pid>/stat after the command name (state is index 0), or None."""
    try:
        with open("/proc/{}/stat".format(int(pid)), "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def process_start_ticks(pid):
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    if not pid or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat_fields(pid)
    return not (fields and fields[0] == "Z")


def group_members(pgid):
    """Pids of live (non-zombie) processes in process group ``pgid`` (Linux /proc)."""
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        fields = _proc_stat_fields(name)
        if fields and len(fields) > 2 and fields[0] != "Z" and fields[2] == str(int(pgid)):
            members.append(int(name))
    return members


def group_alive(pgid):
    """True while any non-zombie process is left in process group ``pgid``."""
    try:
        os.killpg(int(pgid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.isdir("/proc/self"):
        return bool(group_members(pgid))
    return True


def kill_group(pgid, sig=signal.SIGTERM, grace=5.0):
    """Send ``sig`` to the whole process group, then SIGKILL if it outlives ``grace``.

    Returns once the group is gone (or KILL_SETTLE seconds after SIGKILL, for a
    process stuck in the kernel), so callers may rely on it being dead.
    """
    try:
        os.killpg(int(pgid), sig)
    except ProcessLookupError:
        return
    if _wait_group_gone(pgid, grace):
        return
    try:
        os.killpg(int(pgid), signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_group_gone(pgid, KILL_SETTLE)


def _wait_group_gone(pgid, timeout):
    """Poll until the group has no live member; False if it outlived ``timeout``."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- launchers


def _check_session_name(session):
    if not _SESSION_OK.fullmatch(session or "") or len(session) > SESSION_NAME_MAX:
        raise LaunchError("bad session name {!r} (use session_name())".format(session))


def _start_dir(cwd, files):
    """Where the launcher process starts; the wrapper itself cds into the job's cwd."""
    expanded = os.path.expanduser(cwd or "")
    return expanded if expanded and os.path.isdir(expanded) else files.control_dir


def _first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _require_binary(name):
    found = shutil.which(name)
    if not found:
        raise LaunchError(
            "{0} is not installed on this host (launcher: {0}); install it or set launcher: process".format(name)
        )
    return found


@dataclass(frozen=True)
class SessionListing:
    """What a session server reports: live sessions and dead leftovers (screen)."""

    live: Set[str] = field(default_factory=set)
    dead: Set[str] = field(default_factory=set)


class Launcher:
    """Interface: run an attempt's wrapper in a named detached session."""

    name = "abstract"

    def start(self, session, files, cwd):
        """Start ``files.script`` detached in ``session``; LaunchError on failure."""
        raise NotImplementedError

    def listing(self, prefix=SESSION_PREFIX):
        """Live and dead sessions whose names start with ``prefix``."""
        raise NotImplementedError

    def sessions(self, prefix=SESSION_PREFIX):
        """Names of the live sessions we own."""
        return set(self.listing(prefix).live)

    def alive(self, session):
        return session in self.listing(session).live

    def kill(self, session):
        """Close the session if it exists (the wrapper then stops the job's group)."""
        raise NotImplementedError

    def wipe(self):
        """Remove dead leftovers the session server keeps around."""


class _CommandLauncher(Launcher):
    """Shared plumbing for launchers driven by a command-line session server."""

    timeout = 15.0

    def __init__(self, binary):
        self.binary = binary

    def _env(self):
        return dict(os.environ)

    def _base(self):
        return [self.binary]

    def _run(self, args, cwd=None):
        try:
            return subprocess.run(
                self._base() + list(args),
                cwd=cwd,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.timeout,
                universal_newlines=True,
                errors="replace",
            )
        except subprocess.TimeoutExpired:
            raise LaunchError("{} {} did not answer within {:g} s".format(self.name, args[0], self.timeout))
        except OSError as exc:
            raise LaunchError("cannot run {}: {}".format(self.binary, exc.strerror or exc))


class ScreenLauncher(_CommandLauncher):
    """GNU screen: ``screen -dmS <name> bash <wrapper>``; ``screen -r <name>`` attaches.

    ``screendir`` (SCREENDIR) keeps sessions in a private socket folder (tests).
    """

    name = "screen"
    _LINE = re.compile(r"^\s+(\d+)\.(\S+)\s.*\(([^()]*)\)\s*$")

    def __init__(self, binary=None, screendir=None):
        super().__init__(binary or _require_binary("screen"))
        self.screendir = screendir

    def _env(self):
        env = dict(os.environ)
        if self.screendir:
            env["SCREENDIR"] = self.screendir
        return env

    def start(self, session, files, cwd):
        _check_session_name(session)
        if self.alive(session):
            raise LaunchError("screen session {} is already running".format(session))
        proc = self._run(["-dmS", session, "bash", files.script], cwd=_start_dir(cwd, files))
        if proc.returncode != 0:
            raise LaunchError(
                "screen could not start session {}: {}".format(session, _first_line(proc.stdout) or "exit status %d" % proc.returncode)
            )

    def entries(self):
        """(pid, name, dead) for every socket ``screen -ls`` reports."""
        proc = self._run(["-ls"])
        entries = []
        for line in proc.stdout.splitlines():
            match = self._LINE.match(line)
            if match:
                pid, name, status = match.groups()
                entries.append((int(pid), name, status.startswith("Dead")))
        return entries

    def listing(self, prefix=SESSION_PREFIX):
        live, dead = set(), set()
        for _pid, name, is_dead in self.entries():
            if name.startswith(prefix):
                (dead if is_dead else live).add(name)
        return SessionListing(live=live, dead=dead)

    def dead_sessions(self, prefix=SESSION_PREFIX):
        """Sessions whose screen process died without cleaning up ("Dead ???")."""
        return set(self.listing(prefix).dead)

    def kill(self, session):
        _check_session_name(session)
        wipe_needed = False
        for pid, name, is_dead in self.entries():
            if name != session:
                continue
            if is_dead:
                wipe_needed = True
            else:
                self._run(["-S", "{}.{}".format(pid, name), "-X", "quit"])
        if wipe_needed:
            self.wipe()

    def wipe(self):
        self._run(["-wipe"])


class TmuxLauncher(_CommandLauncher):
    """tmux: the session is named with ``.`` → ``_`` and tagged ``@ledger_session``.

    ``socket`` (``tmux -S``) selects a private tmux server (tests).
    """

    name = "tmux"
    _NO_SERVER = ("no server running", "error connecting", "No such file or directory")

    def __init__(self, binary=None, socket=None):
        super().__init__(binary or _require_binary("tmux"))
        self.socket = socket

    def _base(self):
        return [self.binary] + (["-S", self.socket] if self.socket else [])

    @staticmethod
    def tmux_name(session):
        """The name tmux will accept for ``session`` (tmux forbids '.' and ':')."""
        return session.replace(".", "_").replace(":", "_")

    def start(self, session, files, cwd):
        _check_session_name(session)
        tname = self.tmux_name(session)
        if self._has(tname):
            raise LaunchError("tmux session {} is already running".format(tname))
        shell_command = "exec bash {}".format(_q(files.script))
        proc = self._run(
            ["new-session", "-d", "-s", tname, "-c", _start_dir(cwd, files), shell_command,
             ";", "set-option", "@ledger_session", session,
             ";", "set-window-option", "remain-on-exit", "off"],
        )
        if proc.returncode != 0:
            raise LaunchError(
                "tmux could not start session {}: {}".format(tname, _first_line(proc.stdout) or "exit status %d" % proc.returncode)
            )

    def _has(self, tname):
        return self._run(["has-session", "-t", "=" + tname]).returncode == 0

    def listing(self, prefix=SESSION_PREFIX):
        proc = self._run(["list-sessions", "-F", "#{session_name}\t#{@ledger_session}"])
        live = set()
        if proc.returncode != 0:
            if any(marker in proc.stdout for marker in self._NO_SERVER):
                return SessionListing()
            raise LaunchError("tmux list-sessions failed: {}".format(_first_line(proc.stdout)))
        for line in proc.stdout.splitlines():
            tname, _, ledger_name = line.partition("\t")
            name = ledger_name or tname
            if name.startswith(prefix):
                live.add(name)
        return SessionListing(live=live)

    def kill(self, session):
        _check_session_name(session)
        self._run(["kill-session", "-t", "=" + self.tmux_name(session)])

    def kill_server(self):
        """Stop this launcher's tmux server (tests with a private socket)."""
        self._run(["kill-server"])


class ProcessLauncher(Launcher):
    """A bare detached process group: ``bash <wrapper>`` under setsid, no terminal.

    Bookkeeping lives in ``<job>.<attempt>.wpid`` beside the script; see the module
    docstring for how sessions are found again after a restart.
    """

    name = "process"

    def __init__(self, control_dirs=()):
        self.control_dirs = [os.path.expanduser(d) for d in control_dirs]
        self._children = {}

    def _dirs(self, extra=None):
        seen = []
        for folder in list(self.control_dirs) + [os.path.expanduser(d) for d in (extra or ())]:
            if folder not in seen:
                seen.append(folder)
        return seen

    def start(self, session, files, cwd):
        _check_session_name(session)
        if self.alive(session, control_dirs=[files.control_dir]):
            raise LaunchError("process session {} is already running".format(session))
        try:
            child = subprocess.Popen(
                ["bash", files.script],
                cwd=_start_dir(cwd, files),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise LaunchError("cannot start {}: {}".format(files.script, exc.strerror or exc))
        record = {"session": session, "pid": child.pid, "start_ticks": process_start_ticks(child.pid)}
        _atomic_write(files.wpid, (json.dumps(record) + "\n").encode("utf-8"), 0o600)
        self._children[session] = child
        if files.control_dir not in self.control_dirs:
            self.control_dirs.append(files.control_dir)

    def _records(self, control_dirs=None):
        """Every readable .wpid record in the known control folders."""
        records = []
        for folder in self._dirs(control_dirs):
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for name in names:
                if not name.endswith(".wpid"):
                    continue
                try:
                    with open(os.path.join(folder, name), "r", encoding="utf-8") as fh:
                        records.append(json.load(fh))
                except (OSError, ValueError):
                    continue
        return records

    def _record_alive(self, record):
        child = self._children.get(record.get("session"))
        if child is not None and child.pid == record.get("pid") and child.poll() is not None:
            return False
        pid = record.get("pid")
        if not process_alive(pid):
            return False
        ticks = record.get("start_ticks")
        return ticks is None or process_start_ticks(pid) in (None, ticks)

    def listing(self, prefix=SESSION_PREFIX, control_dirs=None):
        live = set()
        for record in self._records(control_dirs):
            name = str(record.get("session", ""))
            if name.startswith(prefix) and self._record_alive(record):
                live.add(name)
        return SessionListing(live=live)

    def sessions(self, prefix=SESSION_PREFIX, control_dirs=None):
        return set(self.listing(prefix, control_dirs).live)

    def alive(self, session, control_dirs=None):
        return session in self.listing(session, control_dirs).live

    def kill(self, session, control_dirs=None):
        for record in self._records(control_dirs):
            if record.get("session") == session and self._record_alive(record):
                try:
                    os.killpg(int(record["pid"]), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        child = self._children.get(session)
        if child is not None:
            child.poll()


_LAUNCHERS = {"screen": ScreenLauncher, "tmux": TmuxLauncher, "process": ProcessLauncher}


def get_launcher(name, **options):
    """The launcher called ``name`` ("screen", "tmux" or "process").

    ``options`` go to the class: ``screendir`` (screen), ``socket`` (tmux),
    ``control_dirs`` (process). LaunchError if the binary is missing.
    """
    cls = _LAUNCHERS.get(name)
    if cls is None:
        raise LaunchError("unknown launcher {!r} (choose screen, tmux or process)".format(name))
    return cls(**options)
