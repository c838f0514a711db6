"""Names the scheduler derives from (run, job, attempt): pure, shared by decide and launchers.

Session names must be predictable (a user types ``screen -r ledger.<run>.<job>.a2``), safe
for screen and tmux, unique per attempt, and short enough for ``screen -S <pid>.<name>``
(screen caps that at 80 characters).
"""

import hashlib
import re

SESSION_PREFIX = "ledger."
SESSION_NAME_MAX = 72

_SAFE_PART = re.compile(r"[A-Za-z0-9_+-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_+-]")


def session_name(run, job, attempt):
    """A screen/tmux-safe session name, unique per (run, job, attempt).

    Plain form ``ledger.<run>.<job>.a<attempt>`` when run and job are made of
    ``[A-Za-z0-9_+-]`` and it fits; otherwise the parts are sanitised, shortened and
    a hash of the exact triple is appended as a fifth dotted part, so a hashed name can
    never equal a plain one.
    """
    run, job, attempt = str(run), str(job), int(attempt)
    plain = "{}{}.{}.a{}".format(SESSION_PREFIX, run, job, attempt)
    if _SAFE_PART.fullmatch(run) and _SAFE_PART.fullmatch(job) and len(plain) <= SESSION_NAME_MAX:
        return plain
    digest = hashlib.sha256("\0".join((run, job, str(attempt))).encode("utf-8", "surrogateescape"))
    tail = ".a{}.{}".format(attempt, digest.hexdigest()[:12])
    room = SESSION_NAME_MAX - len(SESSION_PREFIX) - len(tail) - 1
    safe_run = _UNSAFE_CHAR.sub("_", run) or "_"
    safe_job = _UNSAFE_CHAR.sub("_", job) or "_"
    run_room = max(1, min(len(safe_run), room // 2))
    job_room = max(1, room - min(len(safe_run), run_room))
    return "{}{}.{}{}".format(SESSION_PREFIX, safe_run[:run_room], safe_job[:job_room], tail)
