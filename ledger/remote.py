"""Which GPU host a command talks to, and how: here, or through one SSH connection.

``backend_for(host)`` returns an object with one face for both cases:
``call(name, **kwargs)`` runs ``ledger.api.<name>`` on the host and returns its
JSON-able answer; ``submit``, ``check`` and ``pull`` add what needs more than one
call. A remote call is one SSH command running the host-side agent from this
program's bundle (installed on first need); one ``RemoteBackend`` keeps one
connection for the whole CLI command.
"""

import json
import os
import secrets
import time

from . import api
from .errors import LedgerError, NotFoundError

LOCAL_NAMES = (None, "", "local", "localhost")

#: agent commands that may run twice without harm: a dropped connection reconnects
#: and reruns them. ``submit`` is idempotent through its request id.
RERUN_SAFE = ("status", "replay", "history", "summary", "sql", "logs", "check", "host_info",
              "scheduler_info", "pause", "resume", "stop", "submit")
AGENT_TIMEOUT = 120.0


def backend_for(host=None, db=None, accept_new_host_key=False):
    if host in LOCAL_NAMES:
        return LocalBackend(db)
    return RemoteBackend(host, db=db, accept_new_host_key=accept_new_host_key)


class LocalBackend:
    """The GPU host is this machine: call the library directly."""

    label = where = "local"

    def __init__(self, db=None):
        self.db = db

    def call(self, name, **kwargs):
        return getattr(api, name)(self.db, **kwargs)

    def submit(self, plan, new_run=False, gpu_provider=None, check=True):
        plan = _with_provider(plan, gpu_provider)
        if check:
            refuse_if_blocked(self.check(plan), self.label)
        return api.submit(self.db, plan.to_dict(), host="local", new_run=new_run, gpu_provider=gpu_provider)

    def check(self, plan):
        return api.check(self.db, plan.to_dict())

    def pull(self, dest):
        return api.backup(self.db, _pull_destination(dest))

    def close(self):
        pass


class RemoteBackend:
    """The GPU host is reached over SSH; the agent runs there from the bundle."""

    def __init__(self, host, db=None, accept_new_host_key=False):
        from .transport import open_transport
        self.label = host
        self.db = db
        self.transport = open_transport(host, accept_new_host_key=accept_new_host_key)
        self.where = getattr(self.transport, "label", host)     # "gpu-b (via gpu-a)"
        self.installed = None
        record_host(host, db)

    def close(self):
        self.transport.close()

    def call(self, name, **kwargs):
        from .bundle import agent_command, install_bundle, is_missing_bundle
        command = agent_command(name, self.db)
        data = json.dumps(kwargs).encode()
        rerun = name in RERUN_SAFE
        res = self.transport.run(command, input=data, timeout=AGENT_TIMEOUT, retry_safe=rerun)
        if is_missing_bundle(res) and self.installed is None:
            self.installed = install_bundle(self.transport)
            res = self.transport.run(command, input=data, timeout=AGENT_TIMEOUT, retry_safe=rerun)
        return _decode_agent(self.label, name, res)

    def submit(self, plan, new_run=False, gpu_provider=None, check=True):
        plan = _with_provider(plan, gpu_provider)
        if check:
            refuse_if_blocked(self.check(plan), self.label)
        # the request id makes a rerun after a dropped connection return the same run
        return self.call("submit", plan_dict=plan.to_dict(), host=self.label, new_run=new_run,
                         gpu_provider=gpu_provider, request_id=secrets.token_hex(8))

    def check(self, plan):
        report = self.call("check", plan_dict=plan.to_dict())
        route = getattr(self.transport, "route", None)
        detail = " -> ".join(hop.address for hop in route) if route else self.where
        report["host"].insert(0, {"check": "host reachable", "ok": True, "detail": detail})
        return report

    def pull(self, dest):
        dest = _pull_destination(dest)
        snap = self.call("backup", dest=None)
        try:
            self.transport.get_file(snap["path"], dest)
        finally:
            self.transport.run(["rm", "-f", "--", snap["path"]], retry_safe=True)
        os.chmod(dest, 0o600)
        return {"path": dest, "size": snap["size"]}


def _pull_destination(dest):
    """Where `ledger pull` writes: a file in a folder that exists (a typo in -o must not
    create folders), never an existing folder."""
    dest = os.path.abspath(dest)
    folder = os.path.dirname(dest)
    if not os.path.isdir(folder):
        raise LedgerError("pull: folder %s does not exist (create it, or pick another -o)" % folder)
    if os.path.isdir(dest):
        raise LedgerError("pull: %s is a folder; give a file name, e.g. -o %s" % (dest, os.path.join(dest, "ledger.db")))
    return dest


def _with_provider(plan, gpu_provider):
    """The plan as the host's scheduler will run it (``--gpu-provider`` overrides the manifest)."""
    if not gpu_provider:
        return plan
    from .plan import Plan
    return Plan.from_dict(dict(plan.to_dict(), gpu_provider=gpu_provider))


def refuse_if_blocked(report, label):
    """`submit` checks first, on the host the jobs will run on, and refuses a run that cannot start."""
    problems = blocking_problems(report, label)
    if problems:
        raise LedgerError("preflight check failed on %s" % label, problems=problems + [
            "run `ledger check --host %s` for the full report, or submit with --no-check" % label])


def blocking_problems(report, label):
    """The lines that make `submit` refuse: host checks that failed (GPUs busy right now
    only means the jobs wait) and jobs that cannot start at all."""
    lines = ["%s: %s failed: %s" % (label, h["check"], h["detail"]) for h in report["host"]
             if h["ok"] is False]
    if lines:
        return lines
    bad = [j for j in report["jobs"] if j["blocked"]]
    lines = ["%s: job %s blocked: %s" % (label, j["job"], "; ".join(j["reasons"])) for j in bad[:20]]
    if len(bad) > 20:
        lines.append("%s: ... and %d more blocked jobs" % (label, len(bad) - 20))
    return lines


def _decode_agent(host, name, res):
    text = res.stdout.decode("utf-8", "replace").strip()
    err = res.stderr.decode("utf-8", "replace").strip()
    try:
        reply = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise LedgerError("%s: the ledger agent gave no answer to %s (exit %s): %s"
                          % (host, name, res.returncode, (err.splitlines() or ["no output"])[-1]))
    if reply.get("ok"):
        return reply["result"]
    err_cls = NotFoundError if reply.get("type") == "NotFoundError" else LedgerError
    problems = ["%s: %s" % (host, p) for p in reply.get("problems") or []]
    exc = err_cls("%s: %s" % (host, reply.get("error")), problems=problems)
    exc.exit_code = reply.get("exit_code", 2)
    raise exc


# ---- hosts seen from this laptop --------------------------------------------

def hosts_file():
    return os.path.join(os.path.expanduser(os.environ.get("LEDGER_HOME", "~/.ledger")), "hosts.json")


def _read_hosts():
    try:
        with open(hosts_file()) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for host, entry in seen.items() if isinstance(seen, dict) else ():
        if not isinstance(entry, dict):          # older format: host -> last seen
            entry = {"last_seen": entry, "dbs": [None]}
        out[host] = entry
    return out


def record_host(host, db=None):
    """Remember a host (and which ledger on it) for `ledger hosts`; best effort."""
    seen = _read_hosts()
    entry = seen.setdefault(host, {"dbs": []})
    entry["last_seen"] = time.time()
    if db not in entry["dbs"]:
        entry["dbs"].append(db)
    path = hosts_file()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = "%s.tmp-%d" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(seen, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def hosts_report(db=None, accept_new_host_key=False):
    """One row per host (and ledger) seen: scheduler state, runs, a one-line GPU picture.
    Each host costs one connection; an unreachable one is a row with its error. This
    machine is listed when it has a ledger of its own."""
    rows = []
    if os.path.exists(api.db_path(db)):        # this machine counts once it has a ledger
        rows += _host_row("local", [db], accept_new_host_key)
    for host, entry in sorted(_read_hosts().items()):
        rows += _host_row(host, entry.get("dbs") or [None], accept_new_host_key)
    return rows


def _host_row(host, dbs, accept_new_host_key):
    try:
        backend = backend_for(host, db=dbs[0], accept_new_host_key=accept_new_host_key)
    except LedgerError as exc:
        return [{"host": host, "error": str(exc).splitlines()[0]}]
    rows = []
    try:
        for db in dbs:
            backend.db = db
            try:
                info = backend.call("host_info")
            except LedgerError as exc:
                info = {"error": str(exc).splitlines()[0]}
            info["host"] = host if len(dbs) == 1 else "%s:%s" % (host, db or "~/.ledger/ledger.db")
            rows.append(info)
    finally:
        backend.close()
    return rows
