"""The self-contained program a GPU host runs: ``~/.ledger/bundle/<key>/``.

The host needs only python3 >= 3.9 and screen: nothing is pip-installed there and
it needs no internet. The bundle holds the ``ledger`` package (store, migrations,
scheduler, simulator, agent) and pure-Python copies of SQLAlchemy, alembic and
their dependencies (compiled speedups are left out; SQLAlchemy falls back to pure
Python). Its key is the version plus a hash of what is in it, so a changed
program is a new folder.

Installing is one command on the host: the tarball is streamed to its stdin and
unpacked under a temporary name (``<key>.tmp-<pid>``), with the folder modes set
(0700 folders, 0600 files), then renamed into place when complete. The installer
holds a per-key lock while it works, so a concurrent install waits, and leftovers
of an installer that died (a dropped connection) are removed by the next one: a
half bundle is never used and never stays.

``LEDGER_BUNDLE_VERSION`` replaces the version part of the key (tests use it to
play an older release on a host).
"""

import hashlib
import importlib.util
import io
import os
import shlex
import tarfile

from . import __version__
from .errors import LedgerError

#: pure-Python packages (import name) the host needs besides ledger itself.
VENDORED = ("sqlalchemy", "alembic", "mako", "markupsafe", "typing_extensions")
#: parts of ledger the host never uses (they need click / paramiko / YAML).
HOST_SKIP = {"cli", "transport.py", "remote.py", "manifest.py", "examples"}
SOURCE_SUFFIXES = (".py", ".mako")
INSTALL_TIMEOUT = 300.0

RUN_PY = '''"""Entry point of a ledger bundle on a GPU host (generated; do not edit)."""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.version_info < (3, 9):
    sys.stdout.write(json.dumps({"ok": False, "exit_code": 2, "error": "python3 on this host is %%s; ledger needs 3.9 or newer" %% sys.version.split()[0]}) + "\\n")
    sys.exit(3)
sys.path[:0] = [HERE, os.path.join(HERE, "vendor")]
os.environ["LEDGER_BUNDLE_KEY"] = %(key)r
os.environ.setdefault("DISABLE_SQLALCHEMY_CEXT_RUNTIME", "1")
cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
if cmd == "agent":
    from ledger.agent import main
    sys.exit(main(args))
elif cmd == "scheduler":
    from ledger.scheduler import main
    sys.exit(main(args))
elif cmd == "sim":
    import runpy
    sys.argv = ["ledger.sim"] + args
    runpy.run_module("ledger.sim", run_name="__main__")
else:
    sys.stderr.write("usage: run.py agent|scheduler|sim ...\\n")
    sys.exit(2)
'''

# Runs on the host as `python3 -c INSTALL_PY KEY` with the tarball on stdin; prints the
# bundle's folder. Python 3.9 compatible, stdlib only.
INSTALL_PY = r'''
import fcntl, os, shutil, sys, tarfile
key = sys.argv[1]
home = os.path.expanduser("~")
base = os.path.join(home, ".ledger", "bundle")
os.makedirs(base, mode=0o700, exist_ok=True)
for d in (os.path.join(home, ".ledger"), base):
    os.chmod(d, 0o700)
final = os.path.join(base, key)

def locked(name, block):
    fd = os.open(os.path.join(base, "." + name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd

def sweep():
    # leftovers of installers that died: their lock is free again
    for entry in os.listdir(base):
        name, sep, _ = entry.partition(".tmp-")
        if not sep or not name:
            continue
        fd = lock if name == key else locked(name, block=False)
        if fd is not None:
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
            if fd != lock:
                os.close(fd)

lock = locked(key, block=True)
sweep()
if os.path.exists(os.path.join(final, "run.py")):
    sys.stdin.buffer.read()
    print(final)
    sys.exit(0)
tmp = os.path.join(base, "%s.tmp-%d" % (key, os.getpid()))
os.mkdir(tmp, 0o700)
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise SystemExit("unsafe member in bundle: %r" % m.name)
            target = os.path.join(tmp, *parts)
            if m.isdir():
                os.makedirs(target, 0o700, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
            src = tf.extractfile(m)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
    if not os.path.exists(os.path.join(tmp, "run.py")):
        raise SystemExit("bundle upload incomplete (no run.py)")
    for d, dirs, files in os.walk(tmp):
        os.chmod(d, 0o700)
        for f in files:
            os.chmod(os.path.join(d, f), 0o600)
    os.rename(tmp, final)
except BaseException as exc:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(exc, (tarfile.TarError, EOFError, OSError)):
        raise SystemExit("bundle upload broken off: %s" % (str(exc) or type(exc).__name__))
    raise
print(final)
'''


def _package_dir(name):
    """Where a package (its folder) or module (its file) lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise LedgerError("cannot build the host bundle: %s is not installed here" % name)
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return spec.origin


def bundle_files():
    """(archive name, local path) of everything the bundle holds, sorted."""
    out = _walk(_package_dir("ledger"), "ledger", skip=HOST_SKIP)
    # in a source checkout migrations/ lives beside ledger/; installed, inside it
    out += _walk(_package_dir("ledger.migrations"), "ledger/migrations")
    for name in VENDORED:
        path = _package_dir(name)
        if os.path.isdir(path):
            out += _walk(path, "vendor/" + name)
        else:
            out.append(("vendor/" + os.path.basename(path), path))
    seen, unique = set(), []
    for arc, path in sorted(out):
        if arc not in seen:
            seen.add(arc)
            unique.append((arc, path))
    return unique


def _walk(root, prefix, skip=()):
    out = []
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        dirs[:] = sorted(x for x in dirs if x != "__pycache__" and (rel != "." or x not in skip))
        for f in sorted(files):
            if rel == "." and f in skip:
                continue
            if f.endswith(SOURCE_SUFFIXES):
                arc = prefix if rel == "." else prefix + "/" + rel.replace(os.sep, "/")
                out.append((arc + "/" + f, os.path.join(d, f)))
    return out


def bundle_version():
    return os.environ.get("LEDGER_BUNDLE_VERSION") or __version__


def bundle_key(files=None):
    """`<version>-<hash of every file>`: the same program always gets the same folder."""
    h = hashlib.sha256()
    for arc, path in files or bundle_files():
        h.update(arc.encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return "%s-%s" % (bundle_version(), h.hexdigest()[:12])


_KEYS = {}


def current_key():
    """This program's bundle key (computed once per process and version)."""
    version = bundle_version()
    if version not in _KEYS:
        _KEYS[version] = bundle_key()
    return _KEYS[version]


def build_tarball_bytes():
    """The bundle as gzip'd tar bytes; returns (key, data)."""
    files = bundle_files()
    key = bundle_key(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tf:
        for arc, local in files:
            info = tf.gettarinfo(local, arcname=arc)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o600
            with open(local, "rb") as f:
                tf.addfile(info, f)
        data = (RUN_PY % {"key": key}).encode()
        info = tarfile.TarInfo("run.py")
        info.size, info.mode = len(data), 0o600
        tf.addfile(info, io.BytesIO(data))
    return key, buf.getvalue()


def build_folder(dest):
    """Unpack the bundle into ``dest`` (tests and local dry runs use this)."""
    key, data = build_tarball_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf.getmembers():
            tf.extract(m, dest)
    return key


def remote_entry(key=None):
    """The bundle's run.py on the host, as shell text ("$HOME" left for the host's shell)."""
    return '"$HOME"/.ledger/bundle/%s/run.py' % shlex.quote(key or current_key())


def agent_command(name, db=None):
    """The one shell command a remote call runs."""
    words = [shlex.quote(w) for w in ["agent", name] + (["--db", db] if db else [])]
    return "python3 %s %s" % (remote_entry(), " ".join(words))


def is_missing_bundle(result):
    """python3 says "can't open file" when the bundle of this key is not on the host."""
    return result.returncode == 2 and b"can't open file" in result.stderr and b".ledger/bundle/" in result.stderr


def install_bundle(transport):
    """Put this program's bundle on the host (one command; see the module docstring)."""
    from .errors import TransportError
    key, data = build_tarball_bytes()
    try:
        res = transport.run(["python3", "-c", INSTALL_PY, key], input=data, timeout=INSTALL_TIMEOUT)
    except TransportError as exc:
        if "dropped" not in str(exc):
            raise
        raise TransportError("connection to %s dropped while uploading the ledger bundle %s; nothing was "
                             "installed or submitted, run the command again" % (transport.host, key)) from None
    if res.returncode != 0:
        lines = res.stderr.decode("utf-8", "replace").strip().splitlines()
        if res.returncode == 127:
            raise LedgerError("%s: python3 is not installed on the host (ledger needs python3 >= 3.9 there)"
                              % transport.host)
        raise LedgerError("%s: could not install the ledger bundle %s: %s" % (
            transport.host, key, lines[-1] if lines else "exit code %d" % res.returncode))
    return key
