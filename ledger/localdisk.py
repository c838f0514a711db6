"""Keep the ledger on a local disk: SQLite's WAL (shared memory, fcntl locks) is unsafe on a
network filesystem, and a home folder on NFS is often shared by several GPU servers.

``ledger_path(path)`` is where the ledger really lives: ``path`` itself when its folder is
on a local filesystem, else ``/var/tmp/ledger-<uid>/<hostname>.db`` (``$LEDGER_LOCAL_DIR``
overrides the folder), with a one-line note saying so. A ledger that already exists on the
network filesystem is refused with a message naming the fix (move it), because silently
switching to an empty local file would hide its runs.

The filesystem type comes from ``/proc/self/mountinfo`` (Linux): the mount point that is the
longest prefix of the folder's real path. Standard library only, Python 3.9.
"""

import os
import socket
import sys

from .errors import LedgerError

#: Filesystem types the ledger never lives on. Every FUSE filesystem counts (sshfs, s3fs,
#: gcsfuse, rclone, ...: none gives SQLite the locking it needs) except ``fuseblk``, a local
#: disk driven through FUSE (NTFS via ntfs-3g).
NETWORK_TYPES = frozenset([
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "orangefs", "pvfs2", "ncpfs", "coda", "fuse", "davfs", "virtiofs",
])
LOCAL_FUSE = frozenset(["fuseblk"])
MOUNTINFO = "/proc/self/mountinfo"

_noted = set()


class NetworkFilesystemError(LedgerError):
    """A ledger exists on a network filesystem; the user must move it to a local disk."""


def _unescape(field):
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo=MOUNTINFO):
    """[(mount point, filesystem type, source)] from mountinfo, in file order."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        out.append((_unescape(fields[4]), tail[0], _unescape(tail[1]) if len(tail) > 1 else ""))
    return out


def filesystem_of(path, mountinfo=MOUNTINFO):
    """(filesystem type, mount point, source) of the folder ``path`` is (or would be) in."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    real = os.path.realpath(folder)
    best = ("", "/", "")
    for point, fstype, source in mounts(mountinfo):   # later mounts hide earlier ones: keep the last
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
            best = (fstype, point, source)
    return best


def is_network(fstype):
    if fstype in LOCAL_FUSE:
        return False
    return fstype in NETWORK_TYPES or fstype.startswith("fuse.") or fstype.startswith("nfs")


def local_ledger_path(environ=os.environ):
    """``$LEDGER_LOCAL_DIR/<hostname>.db``, by default ``/var/tmp/ledger-<uid>/<hostname>.db``."""
    folder = environ.get("LEDGER_LOCAL_DIR") or "/var/tmp/ledger-%d" % os.getuid()
    host = socket.gethostname().split(".")[0] or "localhost"
    return os.path.join(os.path.abspath(os.path.expanduser(folder)), "%s.db" % host)


def ledger_path(path, environ=os.environ, note=None, mountinfo=MOUNTINFO):
    """Where the ledger asked for at ``path`` really lives (see the module docstring)."""
    path = os.path.abspath(path)
    fstype, point, source = filesystem_of(os.path.dirname(path), mountinfo)
    if not is_network(fstype):
        return path
    local = local_ledger_path(environ)
    where = "%s (%s from %s)" % (point, fstype, source) if source else "%s (%s)" % (point, fstype)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        raise NetworkFilesystemError(
            "the ledger %s is on the network filesystem %s, where SQLite cannot lock it safely: stop its "
            "scheduler (ledger stop), move it to a local disk (mkdir -p -m 700 %s && mv %s %s-wal %s), "
            "or set LEDGER_DB to a local path" % (path, where, os.path.dirname(local), path, path, local))
    message = ("ledger: %s is on the network filesystem %s, where SQLite cannot lock safely; using the "
               "local ledger %s (set LEDGER_DB to a local path to choose another)" % (os.path.dirname(path), where,
                                                                                   local))
    if (path, local) not in _noted:
        _noted.add((path, local))
        (note or _stderr)(message)
    return local


def make_private_dirs(folder):
    """``mkdir -p`` whose new folders are 0700 whatever the umask (the ledger's folder, made by
    whichever comes first: the store, the GPU simulator's state, the scheduler's log)."""
    missing = []
    folder = os.path.abspath(folder)
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        try:
            os.mkdir(made, 0o700)
        except FileExistsError:
            continue
        os.chmod(made, 0o700)


def _stderr(message):
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
