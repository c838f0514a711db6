"""Real OpenSSH servers for the transport tests.

Two ``sshd -D`` processes play two GPU hosts: A on 127.0.0.1 and B on 127.0.0.2 (or a
second port on 127.0.0.1 when 127.0.0.2 cannot be bound). Both log in a separate user,
``ledgertest``, so the "laptop" (the user running pytest) and the "GPU host" never share a
home directory or a ``~/.ledger``. Keys, configs and known_hosts files are generated in a
temporary folder per session; nothing in the real ``~/.ssh`` is read or changed.

Import the fixtures into a test module with ``from fixtures_ssh import ssh_env, wait_for``
(or ``from tests.fixtures_ssh ...`` when tests/ is a package).
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import wait_for  # noqa: F401  (re-exported for the test modules)

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
            pytest.skip("ssh tests need root to create the {} user".format(TEST_USER))
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


@dataclass
class SshEnv:
    """Everything a test needs to reach the two servers and to check their side."""

    workdir: Path
    config_path: Path
    known_hosts_path: Path              # A plain, B hashed
    known_hosts_missing_b: Path         # only A
    known_hosts_wrong_a: Path           # A with a different key, B correct
    user: str
    uid: int
    home: Path
    key_path: Path                      # authorized on both servers
    unauthorized_key_path: Path
    host_key_a: Path
    host_key_b: Path
    server_a: SshServer
    server_b: SshServer
    aliases: Dict[str, str] = field(default_factory=dict)

    @property
    def port_a(self) -> int:
        return self.server_a.port

    @property
    def port_b(self) -> int:
        return self.server_b.port

    def run_as_user(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command as the test user on "the GPU host" (this machine)."""
        return subprocess.run(["runuser", "-l", self.user, "-c", command],
                              capture_output=True, text=True, check=check, timeout=30)

    def kill_connections(self, server: Optional[str] = None) -> List[int]:
        """SIGKILL the sshd children serving connections (and their commands), leaving
        the listeners up: the client sees its connection drop, a new one still works."""
        servers = [self.server_a, self.server_b]
        if server is not None:
            servers = [s for s in servers if s.name == server]
        pids = [pid for s in servers for pid in s.connection_pids()]
        kill_pids(pids)
        return pids

    def write_config(self, name: str, text: str) -> Path:
        """A client config with extra stanzas that also includes the base config."""
        path = self.workdir / name
        path.write_text("Include {}\n\n{}\n".format(self.config_path, text))
        return path

    def copy_known_hosts(self, source: Path, dest: Path) -> Path:
        """A private copy for a test that appends to known_hosts."""
        shutil.copyfile(source, dest)
        return dest


def write_client_files(env_dir: Path, a: SshServer, b: SshServer, key: Path) -> Dict[str, Path]:
    """ssh_config (+ an Include'd file) and the known_hosts variants."""
    conf_d = env_dir / "conf.d"
    conf_d.mkdir()
    (conf_d / "inc.conf").write_text(
        "Host gpu-inc\n    HostName {a}\n    Port {pa}\n    User {u}\n"
        "    IdentityFile {k}\n    IdentitiesOnly yes\n".format(
            a=a.address, pa=a.port, u=TEST_USER, k=key))
    config = env_dir / "ssh_config"
    config.write_text(
        "Include {conf_d}/*.conf\n\n"
        "Host gpu-a\n    HostName {a}\n    Port {pa}\n    User {u}\n"
        "    IdentityFile {k}\n    IdentitiesOnly yes\n\n"
        "Host gpu-b\n    HostName {b}\n    Port {pb}\n    User {u}\n"
        "    IdentityFile {k}\n    IdentitiesOnly yes\n    ProxyJump gpu-a\n".format(
            conf_d=conf_d, a=a.address, pa=a.port, b=b.address, pb=b.port, u=TEST_USER, k=key))

    line_a = known_hosts_line(a.address, a.port, a.host_key)
    line_b = known_hosts_line(b.address, b.port, b.host_key)
    wrong_key = keygen(env_dir / "wrong_host_key", "wrong")
    line_wrong_a = known_hosts_line(a.address, a.port, wrong_key)
    files = {
        "known_hosts": line_a + hashed_known_hosts_line(line_b, env_dir),
        "known_hosts_missing_b": line_a,
        "known_hosts_wrong_a": line_wrong_a + line_b,
    }
    paths = {"config": config}
    for name, text in files.items():
        paths[name] = env_dir / name
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="session")
def ssh_env(tmp_path_factory) -> SshEnv:
    """Two running sshd servers and client files for the aliases gpu-a, gpu-b, gpu-inc."""
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed ({} missing)".format(SSHD))
    account = ensure_test_user()
    if os.geteuid() != 0:
        pytest.skip("ssh tests start sshd and must run as root")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    workdir = tmp_path_factory.mktemp("ssh")
    host_key_a = keygen(workdir / "host_a_ed25519", "host-a")
    host_key_b = keygen(workdir / "host_b_ed25519", "host-b")
    key = keygen(workdir / "id_ed25519", "ledgertest-key")
    unauthorized = keygen(workdir / "id_unauthorized", "not-authorized")
    install_authorized_key(account, public_key_text(key))

    address_b = "127.0.0.2" if can_bind("127.0.0.2") else "127.0.0.1"
    servers = []
    try:
        servers.append(start_sshd("a", "127.0.0.1", host_key_a, workdir))
        servers.append(start_sshd("b", address_b, host_key_b, workdir))
        files = write_client_files(workdir, servers[0], servers[1], key)
        yield SshEnv(
            workdir=workdir,
            config_path=files["config"],
            known_hosts_path=files["known_hosts"],
            known_hosts_missing_b=files["known_hosts_missing_b"],
            known_hosts_wrong_a=files["known_hosts_wrong_a"],
            user=TEST_USER,
            uid=account.pw_uid,
            home=Path(account.pw_dir),
            key_path=key,
            unauthorized_key_path=unauthorized,
            host_key_a=host_key_a,
            host_key_b=host_key_b,
            server_a=servers[0],
            server_b=servers[1],
            aliases={"a": "gpu-a", "b": "gpu-b", "inc": "gpu-inc"},
        )
    finally:
        for server in servers:
            server.stop()
