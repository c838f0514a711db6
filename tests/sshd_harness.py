"""Real OpenSSH servers on loopback, for the tests (fixtures_ssh) and the benchmark.

Plain functions, no pytest: ``ensure_test_user()`` gives the ``ledgertest`` account (created
as root when missing), ``keygen`` makes keys, ``start_sshd`` runs ``sshd -D -e`` on a free
port with a config that admits only that user by key, and returns an ``SshServer`` whose log
tells how many connections and commands it served. ``Unavailable`` says why a real sshd
cannot run here (no root, no openssh-server).
"""

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List


class Unavailable(Exception):
    """A real sshd cannot be started on this machine (the reason is the message)."""


SSHD = "/usr/sbin/sshd"
TEST_USER = "ledgertest"
START_DEADLINE = 10.0


def free_port(address: str) -> int:
    """A port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def port_accepts(address: str, port: int) -> bool:
    """True once something accepts TCP connections on ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=0.2):
            return True
    except OSError:
        return False


def can_bind(address: str) -> bool:
    """Whether this machine routes ``address`` to loopback (127.0.0.2 is not everywhere)."""
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


def descendants(pid: int) -> List[int]:
    """Every live process below ``pid``, found through /proc (sshd children call setsid,
    so a process group would miss them)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_pids(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def keygen(path: Path, comment: str) -> Path:
    """An ed25519 key pair without passphrase; returns the private key path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


def public_key_text(private_path: Path) -> str:
    return Path(str(private_path) + ".pub").read_text().strip()


def known_hosts_line(address: str, port: int, private_host_key: Path) -> str:
    """One known_hosts line in OpenSSH's ``[host]:port type base64`` form."""
    key_type, blob = public_key_text(private_host_key).split()[:2]
    return "[{}]:{} {} {}\n".format(address, port, key_type, blob)


def hashed_known_hosts_line(plain_line: str, workdir: Path) -> str:
    """Hash one known_hosts line with ``ssh-keygen -H`` so the ``|1|`` form is OpenSSH's own."""
    scratch = workdir / "to-hash"
    scratch.write_text(plain_line)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(scratch)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hashed = scratch.read_text()
    scratch.unlink()
    Path(str(scratch) + ".old").unlink()
    assert hashed.startswith("|1|"), hashed
    return hashed


def ensure_test_user() -> pwd.struct_passwd:
    """The ``ledgertest`` account, created (as root) if missing, unlocked for key logins."""
    try:
        account = pwd.getpwnam(TEST_USER)
    except KeyError:
        if os.geteuid() != 0:
            raise Unavailable("creating the {} user needs root".format(TEST_USER))
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-p", "*", TEST_USER], check=True)
        account = pwd.getpwnam(TEST_USER)
    if os.geteuid() == 0:
        # sshd with UsePAM no refuses "locked" accounts (password field starting with !).
        shadow = subprocess.run(["getent", "shadow", TEST_USER], capture_output=True, text=True)
        if shadow.stdout.split(":")[1:2] and shadow.stdout.split(":")[1].startswith("!"):
            subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)
    return account


def install_authorized_key(account: pwd.struct_passwd, public_key: str) -> None:
    """Add the test key to the user's authorized_keys with OpenSSH's expected modes.

    Added, not replaced: another test session on this machine (another checkout's suite)
    may be logged in with its own key at the same time."""
    ssh_dir = Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    text = keys.read_text() if keys.exists() else ""
    with open(keys, "a") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + public_key + "\n")
    for path, mode in ((ssh_dir, 0o700), (keys, 0o600)):
        os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(path, mode)


SSHD_CONFIG = """\
ListenAddress {address}:{port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
StrictModes no
UsePAM no
UseDNS no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
PrintMotd no
MaxStartups 100
LogLevel DEBUG1
"""


@dataclass
class SshServer:
    """One running sshd listener and the file it logs to."""

    name: str
    address: str
    port: int
    host_key: Path
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connection_pids(self) -> List[int]:
        """Processes serving connections (forked children and their commands)."""
        return descendants(self.process.pid)

    def stop(self) -> None:
        kill_pids(self.connection_pids())
        self.process.kill()
        self.process.wait(timeout=5)


def start_sshd(name: str, address: str, host_key: Path, workdir: Path) -> SshServer:
    """Start ``sshd -D -e`` on a free port and wait until it accepts connections.

    The port is picked before sshd binds it, so another process could take it in
    between; one retry on another port covers that.
    """
    last_log = ""
    for _ in range(3):
        port = free_port(address)
        config = workdir / "sshd_config_{}".format(name)
        config.write_text(SSHD_CONFIG.format(address=address, port=port, host_key=host_key,
                                             user=TEST_USER))
        log_path = workdir / "sshd_{}.log".format(name)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE
        while process.poll() is None and time.monotonic() < deadline:
            if port_accepts(address, port):
                return SshServer(name, address, port, host_key, log_path, process)
            time.sleep(0.01)
        if process.poll() is None:
            process.kill()
            process.wait()
        last_log = log_path.read_text(errors="replace")
    raise RuntimeError("sshd {} did not start: {}".format(name, last_log[-2000:]))


def check_available() -> None:
    """Raise Unavailable unless this process can start sshd and log in the test user."""
    if not os.path.exists(SSHD):
        raise Unavailable("openssh-server is not installed ({} missing)".format(SSHD))
    if os.geteuid() != 0:
        raise Unavailable("starting sshd for another user needs root")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
