"""The self-contained program a GPU host runs: ``~/.ledger/bundle/<key>/``.

The host needs only python3 >= 3.9 and screen: nothing is pip-installed there and
it needs no internet. The bundle holds the ``ledger`` package (store, migrations,
scheduler, simulator, agent) and pure-Python copies of SQLAlchemy, alembic and
their dependencies (compiled speedups are left out; SQLAlchemy falls back to pure
Python). Its key is the version plus a hash of what is in it, so a changed
program is a new folder; it is uploaded as one tarball, unpacked under a temporary
name and renamed into place when complete, so a dropped connection never leaves a
half bundle behind.
"""

import hashlib
import io
import os
import shlex
import tarfile
import tempfile

from . import __version__
from .errors import LedgerError

#: pure-Python packages (import name) the host needs besides ledger itself.
VENDORED = ("sqlalchemy", "alembic", "mako", "markupsafe", "typing_extensions")
#: parts of ledger the host never uses (they need click / paramiko / YAML).
HOST_SKIP = {"cli", "transport.py", "remote.py", "manifest.py", "examples"}
SOURCE_SUFFIXES = (".py", ".mako")

RUN_PY = '''"""Entry point of a ledger bundle on a GPU host (generated; do not edit)."""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.version_info < (3, 9):
    sys.stdout.write(json.dumps({"ok": False, "exit_code": 2, "error": "python3 on this host is %%s; ledger needs 3.9 or newer" %% sys.version.split()[0]}) + "\\n")
    sys.exit(3)
PATHS = [HERE, os.path.join(HERE, "vendor")]
sys.path[:0] = PATHS
os.environ["PYTHONPATH"] = os.pathsep.join(PATHS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
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

EXTRACT_PY = r'''
import os, shutil, sys, tarfile, tempfile
key, tarball = sys.argv[1], sys.argv[2]
base = os.path.join(os.path.expanduser("~"), ".ledger", "bundle")
os.makedirs(base, mode=0o700, exist_ok=True)
os.chmod(os.path.join(os.path.expanduser("~"), ".ledger"), 0o700)
final = os.path.join(base, key)
if not os.path.exists(os.path.join(final, "run.py")):
    tmp = tempfile.mkdtemp(prefix=key + ".tmp-", dir=base)
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                raise SystemExit("unsafe member in bundle: %r" % m.name)
        tf.extractall(tmp)
    for d, dirs, files in os.walk(tmp):
        os.chmod(d, 0o700)
        for f in files:
            os.chmod(os.path.join(d, f), 0o600)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(final, "run.py")):
            raise
os.unlink(tarball)
print(final)
'''


def _package_dir(name):
    mod = __import__(name)
    path = mod.__file__
    return os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path


def bundle_files():
    """(archive name, local path) of everything the bundle holds, sorted."""
    out = []
    ledger_dir = _package_dir("ledger")
    out += _walk(ledger_dir, "ledger", skip=HOST_SKIP)
    out += _walk(_package_dir("ledger.migrations".split(".")[0]) and os.path.dirname(
        __import__("ledger.migrations", fromlist=["x"]).__file__), "ledger/migrations")
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


def bundle_key(files=None):
    """`<version>-<hash>`: the same program always gets the same folder."""
    h = hashlib.sha256()
    for arc, path in files or bundle_files():
        h.update(arc.encode())
        if arc.startswith("ledger/"):
            with open(path, "rb") as f:
                h.update(f.read())
    for name in VENDORED:
        mod = __import__(name)
        h.update(("%s=%s" % (name, getattr(mod, "__version__", "?"))).encode())
    return "%s-%s" % (__version__, h.hexdigest()[:12])


_KEY = None


def current_key():
    global _KEY
    if _KEY is None:
        _KEY = bundle_key()
    return _KEY


def build_tarball(dest_dir=None):
    """Write the bundle as a .tar.gz; returns (key, path)."""
    files = bundle_files()
    key = bundle_key(files)
    dest_dir = dest_dir or tempfile.mkdtemp(prefix="ledger-bundle-")
    path = os.path.join(dest_dir, "%s.tar.gz" % key)
    with tarfile.open(path, "w:gz") as tf:
        for arc, local in files:
            tf.add(local, arcname=arc, recursive=False)
        data = (RUN_PY % {"key": key}).encode()
        info = tarfile.TarInfo("run.py")
        info.size, info.mode = len(data), 0o600
        tf.addfile(info, io.BytesIO(data))
    return key, path


def build_folder(dest):
    """Unpack the bundle into ``dest`` (tests and local dry runs use this)."""
    key, tarball = build_tarball()
    with tarfile.open(tarball) as tf:
        tf.extractall(dest)
    os.unlink(tarball)
    return key


def remote_entry(transport=None):
    """The bundle's run.py on the host, as shell text ("$HOME" left for the host's shell)."""
    return '"$HOME"/.ledger/bundle/%s/run.py' % current_key()


def agent_command(name, db=None):
    """The one shell command a remote call runs."""
    words = [shlex.quote(w) for w in ["agent", name] + (["--db", db] if db else [])]
    return "python3 %s %s" % (remote_entry(), " ".join(words))


def is_missing_bundle(result):
    """python3 says "can't open file" when the bundle of this key is not on the host."""
    return result.returncode == 2 and b"can't open file" in result.stderr


def ensure_bundle(transport):
    """Install this program's bundle on the host unless it is there already."""
    probe = transport.run("test -f %s && echo present || echo missing" % remote_entry())
    if b"present" in probe.stdout:
        return current_key()
    return install_bundle(transport)


def install_bundle(transport):
    key, tarball = build_tarball()
    try:
        home = transport.home()
        remote_tar = "%s/.ledger/bundle-upload-%s-%d.tar.gz" % (home, key, os.getpid())
        transport.run(["mkdir", "-p", "-m", "700", home + "/.ledger"])
        transport.put_file(tarball, remote_tar, mode=0o600)
        res = transport.run(["python3", "-c", EXTRACT_PY, key, remote_tar], timeout=300)
        if res.returncode != 0:
            transport.run(["rm", "-f", remote_tar])
            raise LedgerError("%s: could not install the ledger bundle: %s" % (
                transport.host, (res.stderr.decode("utf-8", "replace").strip().splitlines() or ["?"])[-1]))
    finally:
        os.unlink(tarball)
        os.rmdir(os.path.dirname(tarball))
    return key
