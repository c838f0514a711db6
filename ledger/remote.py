"""Which GPU host a command talks to, and how: here, or through one SSH connection.

``backend_for(host)`` returns an object with one face for both cases:
``call(name, **kwargs)`` runs ``ledger.api.<name>`` on the host and returns its
JSON-able answer; ``submit``, ``check`` and ``pull`` add what needs more than one
call. Remote calls run the host-side agent from the uploaded bundle and cost one
SSH command each over one connection per CLI invocation.
"""

import json
import os
import time

from . import api
from .errors import LedgerError, NotFoundError

LOCAL_NAMES = (None, "", "local", "localhost")


def backend_for(host=None, db=None, accept_new_host_key=False):
    if host in LOCAL_NAMES:
        return LocalBackend(db)
    return RemoteBackend(host, db=db, accept_new_host_key=accept_new_host_key)


class LocalBackend:
    """The GPU host is this machine: call the library directly."""

    label = "local"

    def __init__(self, db=None):
        self.db = db

    def call(self, name, **kwargs):
        return getattr(api, name)(self.db, **kwargs)

    def submit(self, plan, new_run=False, gpu_provider=None, check=True):
        return api.submit(self.db, plan.to_dict(), host="local", new_run=new_run, gpu_provider=gpu_provider)

    def check(self, plan):
        return api.check(self.db, plan.to_dict())

    def pull(self, dest):
        return api.backup(self.db, dest)


class RemoteBackend:
    """The GPU host is reached over SSH; the agent runs there from the bundle."""

    def __init__(self, host, db=None, accept_new_host_key=False):
        from .transport import open_transport
        self.label = host
        self.db = db
        self.transport = open_transport(host, accept_new_host_key=accept_new_host_key)
        self._python = None
        record_host(host)

    def _agent_argv(self, name):
        from .bundle import remote_entry
        argv = ["python3", remote_entry(self.transport), "agent", name]
        if self.db:
            argv += ["--db", self.db]
        return argv

    def call(self, name, retry_safe=True, **kwargs):
        from .bundle import ensure_bundle_for_read
        ensure_bundle_for_read(self.transport)
        res = self.transport.run(self._agent_argv(name), input=json.dumps(kwargs).encode(),
                                 timeout=120, retry_safe=retry_safe and name not in ("cancel", "retry"))
        return _decode_agent(self.label, name, res)

    def submit(self, plan, new_run=False, gpu_provider=None, check=True):
        from .bundle import ensure_bundle
        ensure_bundle(self.transport)
        if check:
            report = self.check(plan, bundle_ready=True)
            if not report["ok"]:
                bad = [j for j in report["jobs"] if j["blocked"]]
                host_bad = [h for h in report["host"] if not h["ok"] and not h["check"].startswith("GPUs")]
                lines = ["%s: %s failed: %s" % (self.label, h["check"], h["detail"]) for h in host_bad]
                lines += ["%s: job %s blocked: %s" % (self.label, j["job"], "; ".join(j["reasons"])) for j in bad[:20]]
                if lines:
                    raise LedgerError("preflight check failed on %s" % self.label, problems=lines +
                                      ["run `ledger check` for the full report, or submit with --no-check"])
        return self.call("submit", retry_safe=True, plan_dict=plan.to_dict(), host=self.label,
                         new_run=new_run, gpu_provider=gpu_provider)

    def check(self, plan, bundle_ready=False):
        if not bundle_ready:
            from .bundle import ensure_bundle
            ensure_bundle(self.transport)
        return self.call("check", plan_dict=plan.to_dict())

    def pull(self, dest):
        tmp = "/tmp/ledger-pull-%d-%d.db" % (os.getpid(), int(time.time() * 1000))
        out = self.call("backup", dest=tmp)
        try:
            self.transport.get_file(out["path"], dest)
            os.chmod(dest, 0o600)
        finally:
            self.transport.run(["rm", "-f", tmp])
        return {"path": dest}


def _decode_agent(host, name, res):
    text = res.stdout.decode("utf-8", "replace").strip()
    err = res.stderr.decode("utf-8", "replace").strip()
    try:
        reply = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        reply = None
    if reply is None:
        raise LedgerError("%s: the ledger agent gave no answer to %s (exit %s): %s"
                          % (host, name, res.returncode, (err.splitlines() or ["no output"])[-1]))
    if reply.get("ok"):
        return reply["result"]
    err_cls = NotFoundError if reply.get("type") == "NotFoundError" else LedgerError
    exc = err_cls("%s: %s" % (host, reply.get("error")), problems=["%s: %s" % (host, p) for p in reply.get("problems", [])])
    exc.exit_code = reply.get("exit_code", 2)
    raise exc


# ---- hosts seen from this laptop --------------------------------------------

def hosts_file():
    return os.path.join(os.path.expanduser(os.environ.get("LEDGER_HOME", "~/.ledger")), "hosts.json")


def record_host(host):
    path = hosts_file()
    try:
        with open(path) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    seen[host] = time.time()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(seen, f)
    os.replace(tmp, path)


def hosts_report(db=None, accept_new_host_key=False):
    """One row per host seen: scheduler state, runs, a one-line GPU picture."""
    try:
        with open(hosts_file()) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    rows = []
    for host in ["local"] + sorted(seen):
        try:
            backend = backend_for(host, db=db if host == "local" else None, accept_new_host_key=accept_new_host_key)
            info = backend.call("host_info")
            info["host"] = host
        except LedgerError as exc:
            info = {"host": host, "error": str(exc).splitlines()[0]}
        rows.append(info)
    return rows
