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
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import wait_for  # noqa: F401  (re-exported for the test modules)

from sshd_harness import (  # noqa: F401  (re-exported for the test modules)
    SSHD, SSHD_CONFIG, START_DEADLINE, TEST_USER, SshServer, Unavailable, can_bind, descendants, free_port,
    hashed_known_hosts_line, install_authorized_key, keygen, kill_pids, known_hosts_line, port_accepts,
    public_key_text, start_sshd)
from sshd_harness import ensure_test_user as _ensure_test_user


def ensure_test_user():
    """The ``ledgertest`` account; the test is skipped where it cannot exist (no root)."""
    try:
        return _ensure_test_user()
    except Unavailable as exc:
        pytest.skip("ssh tests: %s" % exc)


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
