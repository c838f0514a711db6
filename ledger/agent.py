"""The host side of a remote command: one JSON request on stdin, one JSON line out.

``python3 <bundle>/run.py agent NAME [--db PATH]`` reads the keyword arguments of
``ledger.api.NAME`` as JSON from stdin, runs it against this host's ledger, and
prints ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``. The
laptop formats the answer; nothing here needs click, YAML or paramiko.
"""

import json
import sys

from . import api
from .errors import LedgerError

COMMANDS = ("submit", "status", "replay", "history", "summary", "sql", "logs", "cancel", "retry",
            "pause", "resume", "stop", "check", "host_info", "backup", "scheduler_info")


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        _reply({"ok": False, "error": "unknown agent command %r" % (argv[:1] or [""])[0], "exit_code": 2})
        return 2
    name, db = argv[0], None
    if "--db" in argv:
        db = argv[argv.index("--db") + 1]
    try:
        raw = sys.stdin.read()
        kwargs = json.loads(raw) if raw.strip() else {}
        result = getattr(api, name)(db, **kwargs)
    except LedgerError as exc:
        _reply({"ok": False, "error": str(exc), "problems": exc.problems, "exit_code": exc.exit_code,
                "type": type(exc).__name__})
        return 0
    _reply({"ok": True, "result": result})
    return 0


def _reply(obj):
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
