"""Transports against real OpenSSH servers (and the local transport with the same face)."""

import getpass
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

try:
    from tests.fixtures_ssh import ssh_env, wait_for  # noqa: F401  (pytest fixture)
except ImportError:
    from fixtures_ssh import ssh_env, wait_for  # noqa: F401
from ledger.errors import HostKeyError, TransportError
from ledger.transport import (
    CommandFailed, LocalTransport, SshTransport, load_ssh_config, open_transport, parse_jump,
    plan_route,
)

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(60)]


def connect(env, alias="gpu-a", known_hosts=None, **kw) -> SshTransport:
    return SshTransport.connect(alias, config_path=env.config_path,
                                known_hosts=known_hosts or env.known_hosts_path, **kw)


def one_line(error) -> str:
    text = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in text, text
    return text


def host_fingerprint(private_host_key: Path) -> str:
    """What ``ssh-keygen -lf`` says the fingerprint is (OpenSSH as the reference)."""
    out = subprocess.run(["ssh-keygen", "-lf", str(private_host_key) + ".pub"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


@pytest.fixture
def gpu_a(ssh_env):
    with connect(ssh_env) as transport:
        yield transport


@pytest.fixture
def remote_scratch(ssh_env):
    """A directory name in the test user's home, removed afterwards."""
    path = ssh_env.home / "lt-{}".format(secrets.token_hex(4))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["local", "ssh"])
def any_transport(request, tmp_path):
    """(transport, base directory on its host, uid owning files there) for both kinds."""
    if request.param == "local":
        base = tmp_path / "host"
        base.mkdir()
        with LocalTransport() as transport:
            yield transport, base, os.getuid()
        return
    env = request.getfixturevalue("ssh_env")
    base = env.home / "lt-{}".format(secrets.token_hex(4))
    try:
        with connect(env) as transport:
            transport.run(["mkdir", "-p", str(base)], check=True)
            yield transport, base, env.uid
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01beta")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "a.txt", 0o644)
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- reaching hosts through the ssh config -------------------------------------------


def test_run_echo_and_id_as_test_user_through_alias(ssh_env, gpu_a):
    assert gpu_a.run(["echo", "hello"]).stdout == b"hello\n"
    assert gpu_a.run("id -un").stdout.decode().strip() == ssh_env.user
    assert gpu_a.home() == str(ssh_env.home)
    assert gpu_a.commands_run == 3          # one round trip each, on one connection
    assert len(gpu_a._transports) == 1


def test_proxyjump_reaches_b_through_a(ssh_env):
    tunnels = "server_request_direct_tcpip: originator 127.0.0.1 port 0, target {} port {}".format(
        ssh_env.server_b.address, ssh_env.port_b)
    before = ssh_env.server_a.log_text().count(tunnels)
    with connect(ssh_env, "gpu-b") as transport:
        assert [hop.alias for hop in transport.route] == ["gpu-a", "gpu-b"]
        assert transport.label == "gpu-b (via gpu-a)"
        assert transport.run("id -un").stdout == b"ledgertest\n"
        # A's sshd opened the tunnel to B on our behalf...
        assert ssh_env.server_a.log_text().count(tunnels) == before + 1
        # ...and killing A's connections cuts the connection to B.
        ssh_env.kill_connections("a")
        wait_for(lambda: not transport.connected, timeout=5)
        assert transport.run(["echo", "again"], retry_safe=True).stdout == b"again\n"
        assert transport.reconnects == 1


def test_multi_hop_proxyjump_list(ssh_env):
    config = ssh_env.write_config("multi_hop", (
        "Host gpu-b2\n  HostName {b}\n  Port {pb}\n  User ledgertest\n  IdentityFile {k}\n"
        "  ProxyJump gpu-a,ledgertest@gpu-inc:{pa}\n").format(
            b=ssh_env.server_b.address, pb=ssh_env.port_b, pa=ssh_env.port_a, k=ssh_env.key_path))
    with SshTransport.connect("gpu-b2", config_path=config,
                              known_hosts=ssh_env.known_hosts_path) as transport:
        assert [hop.alias for hop in transport.route] == ["gpu-a", "gpu-inc", "gpu-b2"]
        assert transport.run("id -un").stdout == b"ledgertest\n"


def test_alias_from_included_file(ssh_env):
    with connect(ssh_env, "gpu-inc") as transport:
        assert transport.route[-1].port == ssh_env.port_a
        assert transport.run(["id", "-un"]).stdout == b"ledgertest\n"


def test_env_vars_override_config_and_known_hosts(ssh_env, monkeypatch):
    monkeypatch.setenv("LEDGER_SSH_CONFIG", str(ssh_env.config_path))
    monkeypatch.setenv("LEDGER_KNOWN_HOSTS", str(ssh_env.known_hosts_path))
    with open_transport("gpu-a") as transport:
        assert isinstance(transport, SshTransport)
        assert transport.run(["echo", "ok"]).stdout == b"ok\n"


def test_proxycommand_is_honoured(ssh_env):
    relay = "bash -c 'exec 3<>/dev/tcp/%h/%p; cat <&3 & exec cat >&3'"
    config = ssh_env.write_config("proxy_command", (
        "Host gpu-pc\n  HostName {a}\n  Port {pa}\n  User ledgertest\n  IdentityFile {k}\n"
        "  ProxyCommand {relay}\n").format(a=ssh_env.server_a.address, pa=ssh_env.port_a,
                                          k=ssh_env.key_path, relay=relay))
    with SshTransport.connect("gpu-pc", config_path=config,
                              known_hosts=ssh_env.known_hosts_path) as transport:
        assert transport.run(["echo", "piped"]).stdout == b"piped\n"


def test_includes_resolve_like_openssh(tmp_path, monkeypatch):
    """Relative to ~/.ssh (even from a nested file), globbed, nested, loop-safe, and the
    enclosing block resumes after an Include inside it."""
    home = tmp_path / "home"
    ssh_dir = home / ".ssh"
    (ssh_dir / "conf.d" / "nested").mkdir(parents=True)
    (ssh_dir / "config").write_text(
        "Include conf.d/*.conf\n"
        "Host outer\n  HostName outer.example\n  Include conf.d/users/none-*.conf\n"
        "  Include conf.d/port.inc\n  User outeruser\n")
    (ssh_dir / "conf.d" / "10-one.conf").write_text(
        "Host one\n  HostName one.example\n  Include conf.d/nested/deep.conf\n")
    (ssh_dir / "conf.d" / "nested" / "deep.conf").write_text(
        "Host deep\n  HostName deep.example\n  Port 2022\n  Include ~/.ssh/config\n")
    (ssh_dir / "conf.d" / "port.inc").write_text("Port 2200\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LEDGER_SSH_CONFIG", raising=False)
    config = load_ssh_config()
    assert config.lookup("one")["hostname"] == "one.example"
    assert config.lookup("deep")["hostname"] == "deep.example"
    assert config.lookup("deep")["port"] == "2022"
    outer = config.lookup("outer")
    assert (outer["hostname"], outer["port"], outer["user"]) == ("outer.example", "2200", "outeruser")
    assert "port" not in config.lookup("elsewhere")


def test_plan_route_follows_jump_hosts_own_proxyjump():
    from paramiko import SSHConfig
    config = SSHConfig.from_text(
        "Host target\n  ProxyJump mid\nHost mid\n  ProxyJump edge\n  User m\n"
        "Host edge\n  HostName edge.example\nHost loop\n  ProxyJump loop\n")
    assert [h.alias for h in plan_route(config, "target")] == ["edge", "mid", "target"]
    with pytest.raises(TransportError, match="loop"):
        plan_route(config, "loop")
    assert parse_jump("bob@host:2200") == ("host", "bob", 2200)
    assert parse_jump("ssh://bob@[::1]:2201") == ("::1", "bob", 2201)
    assert parse_jump("plain") == ("plain", None, None)


# --- host keys -----------------------------------------------------------------------


def test_hashed_known_hosts_entry_is_matched(ssh_env):
    text = ssh_env.known_hosts_path.read_text()
    assert ssh_env.server_b.address + "]:{}".format(ssh_env.port_b) not in text
    assert text.splitlines()[1].startswith("|1|")
    config = ssh_env.write_config("direct_b", (
        "Host gpu-b-direct\n  HostName {b}\n  Port {pb}\n  User ledgertest\n  IdentityFile {k}\n"
    ).format(b=ssh_env.server_b.address, pb=ssh_env.port_b, k=ssh_env.key_path))
    with SshTransport.connect("gpu-b-direct", config_path=config,
                              known_hosts=ssh_env.known_hosts_path) as transport:
        assert transport.run(["echo", "b"]).stdout == b"b\n"


def test_unknown_host_key_is_refused_with_its_fingerprint(ssh_env):
    with pytest.raises(HostKeyError) as error:
        connect(ssh_env, "gpu-b", known_hosts=ssh_env.known_hosts_missing_b)
    message = one_line(error)
    assert message.startswith("gpu-b (via gpu-a): unknown host key for [{}]:{}".format(
        ssh_env.server_b.address, ssh_env.port_b))
    assert "ssh-ed25519 " + host_fingerprint(ssh_env.host_key_b) in message
    assert "--accept-new-host-key" in message and "ssh-keyscan" in message
    assert error.value.exit_code == 2


def test_unknown_host_key_is_accepted_with_the_flag(ssh_env, tmp_path):
    known_hosts = ssh_env.copy_known_hosts(ssh_env.known_hosts_missing_b, tmp_path / "kh")
    with connect(ssh_env, "gpu-b", known_hosts=known_hosts, accept_new_host_key=True) as t:
        assert t.run(["echo", "trusted"]).stdout == b"trusted\n"
    key_type, blob = Path(str(ssh_env.host_key_b) + ".pub").read_text().split()[:2]
    assert "[{}]:{} {} {}".format(ssh_env.server_b.address, ssh_env.port_b, key_type, blob) \
        in known_hosts.read_text().splitlines()
    with connect(ssh_env, "gpu-b", known_hosts=known_hosts) as t:     # now known
        assert t.run(["echo", "again"]).stdout == b"again\n"


def test_accepted_key_is_hashed_when_config_says_hash_known_hosts(ssh_env, tmp_path):
    known_hosts = ssh_env.copy_known_hosts(ssh_env.known_hosts_missing_b, tmp_path / "kh")
    config = ssh_env.write_config("hashing", (
        "Host gpu-b-hashed\n  HostName {b}\n  Port {pb}\n  User ledgertest\n  IdentityFile {k}\n"
        "  HashKnownHosts yes\n").format(b=ssh_env.server_b.address, pb=ssh_env.port_b,
                                         k=ssh_env.key_path))
    for accept in (True, False):        # accepted once, then known through the hashed line
        with SshTransport.connect("gpu-b-hashed", config_path=config, known_hosts=known_hosts,
                                  accept_new_host_key=accept) as transport:
            assert transport.run(["echo", "ok"]).stdout == b"ok\n"
    added = known_hosts.read_text().splitlines()[-1]
    assert added.startswith("|1|") and ssh_env.server_b.address not in added


def test_changed_host_key_is_refused_even_with_the_flag(ssh_env, tmp_path):
    known_hosts = ssh_env.copy_known_hosts(ssh_env.known_hosts_wrong_a, tmp_path / "kh")
    before = known_hosts.read_text()
    for alias in ("gpu-a", "gpu-b"):
        with pytest.raises(HostKeyError) as error:
            connect(ssh_env, alias, known_hosts=known_hosts, accept_new_host_key=True)
        message = one_line(error)
        assert "HOST KEY CHANGED for [127.0.0.1]:{}".format(ssh_env.port_a) in message
        assert host_fingerprint(ssh_env.host_key_a) in message
    assert "(jump host gpu-a)" in message
    assert known_hosts.read_text() == before


# --- connection errors ---------------------------------------------------------------


def alias_config(env, name, host="127.0.0.1", port=None, key=None):
    return env.write_config("cfg_" + name, (
        "Host {n}\n  HostName {h}\n  Port {p}\n  User ledgertest\n  IdentityFile {k}\n"
        "  IdentitiesOnly yes\n").format(n=name, h=host, p=port or env.port_a, k=key or env.key_path))


def test_connection_refused_names_the_alias(ssh_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = alias_config(ssh_env, "gpu-down", port=closed_port)
    with pytest.raises(TransportError) as error:
        SshTransport.connect("gpu-down", config_path=config, known_hosts=ssh_env.known_hosts_path)
    assert one_line(error) == "gpu-down: connection refused by 127.0.0.1:{}".format(closed_port)
    config = ssh_env.write_config("down_behind_a", (
        "Host gpu-down-b\n  HostName 127.0.0.1\n  Port {}\n  ProxyJump gpu-a\n").format(closed_port))
    with pytest.raises(TransportError) as error:
        SshTransport.connect("gpu-down-b", config_path=config, known_hosts=ssh_env.known_hosts_path)
    assert one_line(error).startswith("gpu-down-b (via gpu-a): jump host gpu-a could not connect "
                                      "to 127.0.0.1:{} (".format(closed_port))


def test_unresolvable_host_name(ssh_env):
    config = alias_config(ssh_env, "gpu-nowhere", host="no-such-host.invalid")
    with pytest.raises(TransportError) as error:
        SshTransport.connect("gpu-nowhere", config_path=config, known_hosts=ssh_env.known_hosts_path)
    assert one_line(error).startswith("gpu-nowhere: cannot resolve host name no-such-host.invalid")


def test_silent_server_times_out(ssh_env):
    """The timeout parameter applies, unless the config's ConnectTimeout says otherwise."""
    with socket.socket() as mute:           # accepts TCP (backlog) but never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen(2)
        port = mute.getsockname()[1]
        config = ssh_env.write_config("mute", (
            "Host gpu-mute\n  HostName 127.0.0.1\n  Port {p}\n\n"
            "Host gpu-mute-1s\n  HostName 127.0.0.1\n  Port {p}\n  ConnectTimeout 1\n").format(p=port))
        for alias, timeout, expected in (("gpu-mute", 0.5, "0.5s"), ("gpu-mute-1s", 30, "1s")):
            started = time.monotonic()
            with pytest.raises(TransportError) as error:
                SshTransport.connect(alias, config_path=config,
                                     known_hosts=ssh_env.known_hosts_path, timeout=timeout)
            assert time.monotonic() - started < 5
            assert one_line(error) == "{}: SSH handshake with {}@127.0.0.1:{} failed: " \
                "no SSH server answered within {}".format(alias, getpass.getuser(), port, expected)


def test_authentication_failure_lists_tried_keys(ssh_env):
    config = alias_config(ssh_env, "gpu-badkey", key=ssh_env.unauthorized_key_path)
    with pytest.raises(TransportError) as error:
        SshTransport.connect("gpu-badkey", config_path=config, known_hosts=ssh_env.known_hosts_path)
    assert one_line(error) == "gpu-badkey: authentication failed for ledgertest@127.0.0.1:{} " \
        "(tried keys: {})".format(ssh_env.port_a, ssh_env.unauthorized_key_path)
    assert error.value.exit_code == 1


def test_authentication_failure_behind_a_jump_host(ssh_env):
    config = ssh_env.write_config("bad_b", (
        "Host gpu-b-bad\n  HostName {b}\n  Port {pb}\n  User nobody-here\n  IdentityFile {k}\n"
        "  IdentitiesOnly yes\n  ProxyJump gpu-a\n").format(
            b=ssh_env.server_b.address, pb=ssh_env.port_b, k=ssh_env.key_path))
    with pytest.raises(TransportError) as error:
        SshTransport.connect("gpu-b-bad", config_path=config, known_hosts=ssh_env.known_hosts_path)
    assert one_line(error).startswith(
        "gpu-b-bad (via gpu-a): authentication failed for nobody-here@{}:{} (tried keys: ".format(
            ssh_env.server_b.address, ssh_env.port_b))


def run_and_kill_midway(env, transport, marker: Path, command: str, **kw):
    """Run ``command`` (which creates ``marker`` first) and drop the connection once the
    marker shows the command is running."""
    killer = threading.Thread(target=lambda: (wait_for(marker.exists, timeout=10),
                                              env.kill_connections("a")))
    killer.start()
    try:
        return transport.run(command, **kw)
    finally:
        killer.join()


def test_dropped_connection_during_a_command(ssh_env, remote_scratch):
    marker = Path(str(remote_scratch) + ".started")
    with connect(ssh_env) as transport:
        started = time.monotonic()
        try:
            with pytest.raises(TransportError) as error:
                run_and_kill_midway(ssh_env, transport, marker,
                                    "touch {} && sleep 30".format(marker))
        finally:
            marker.unlink()
        assert time.monotonic() - started < 10
        assert one_line(error) == "connection to gpu-a dropped while running touch {} && " \
            "sleep 30".format(marker)


def test_retry_safe_reconnects_and_reruns(ssh_env, remote_scratch):
    marker = Path(str(remote_scratch) + ".started")
    command = "if [ -e {m} ]; then echo second; else touch {m}; sleep 30; fi".format(m=marker)
    with connect(ssh_env) as transport:
        try:
            result = run_and_kill_midway(ssh_env, transport, marker, command, retry_safe=True)
        finally:
            marker.unlink()
        assert result.stdout == b"second\n"
        assert (transport.reconnects, transport.commands_run) == (1, 2)


def test_run_timeout(gpu_a, remote_scratch):
    """The call gives up in time; the remote command is not killed (ssh has no reliable way
    to signal it), so the test stops it itself."""
    pid_file = Path(str(remote_scratch) + ".pid")
    command = "echo $$ > {}; exec sleep 10".format(pid_file)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as error:
            gpu_a.run(command, timeout=0.3)
    finally:
        os.kill(int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())),
                signal.SIGKILL)
        pid_file.unlink()
    assert time.monotonic() - started < 3
    assert one_line(error) == "gpu-a: command timed out after 0.3s: " + command
    assert gpu_a.run(["echo", "still usable"]).stdout == b"still usable\n"


# --- behaviours shared by both transports --------------------------------------------


def test_open_transport_local():
    assert isinstance(open_transport(None), LocalTransport)
    assert isinstance(open_transport("local"), LocalTransport)


def test_stdin_reaches_the_command(any_transport):
    transport, _, _ = any_transport
    data = bytes(range(256)) * 4096         # 1 MiB, binary: no deadlock, byte-exact
    result = transport.run(["cat"], input=data)
    assert result.ok and result.stdout == data
    assert transport.run("wc -c", input=b"12345").stdout.strip() == b"5"


def test_exit_code_and_stderr(any_transport):
    transport, _, _ = any_transport
    result = transport.run("echo out; echo oops >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"oops\n")
    with pytest.raises(CommandFailed) as error:
        transport.run("echo oops >&2; exit 4", check=True)
    assert one_line(error).endswith("command failed with exit code 4: echo oops >&2; exit 4: oops")
    assert error.value.result.returncode == 4
    assert transport.run(["no-such-command-xyz"]).returncode == 127


def test_argv_arrives_byte_exact_and_nothing_runs(any_transport):
    transport, base, _ = any_transport
    pwned = base / "pwned"
    tricky = "a b \"c\" 'd' $(touch {p}) `touch {p}` ; touch {p} && \\ é\n* $HOME".format(p=pwned)
    result = transport.run(["printf", "%s|", tricky, "", "x y"])
    assert result.stdout == (tricky + "||x y|").encode()
    assert not pwned.exists()


def test_put_tree_is_atomic_with_private_modes(any_transport, tmp_path):
    transport, base, owner = any_transport
    source = make_tree(tmp_path / "bundle")
    dest = base / "nested" / "bundle"
    assert transport.put_tree(source, dest) is True
    assert (dest / "a.txt").read_text() == "alpha"
    assert (dest / "sub" / "b.bin").read_bytes() == b"\x00\x01beta"
    assert [mode(dest), mode(dest / "sub")] == [0o700, 0o700]
    assert [mode(dest / "a.txt"), mode(dest / "run.sh")] == [0o600, 0o700]
    assert os.stat(dest / "sub" / "b.bin").st_uid == owner
    (source / "a.txt").write_text("a second uploader")
    assert transport.put_tree(source, dest) is False       # the first upload stays
    assert (dest / "a.txt").read_text() == "alpha"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]   # no .tmp- left


def test_put_file_mode_and_get_file(any_transport, tmp_path):
    transport, base, owner = any_transport
    local = tmp_path / "secret.txt"
    local.write_bytes(b"token\x00\xff")
    dest = base / "new-dir" / "secret.txt"
    transport.put_file(local, dest)
    assert dest.read_bytes() == b"token\x00\xff"
    assert (mode(dest), os.stat(dest).st_uid) == (0o600, owner)
    transport.put_file(local, dest, mode=0o640)                       # replaces
    assert mode(dest) == 0o640
    back = tmp_path / "back.txt"
    transport.get_file(dest, back)
    assert back.read_bytes() == b"token\x00\xff"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["secret.txt"]
    with pytest.raises(TransportError) as error:
        transport.get_file(base / "missing", tmp_path / "nothing")
    assert "cannot" in one_line(error) and not (tmp_path / "nothing").exists()


def test_tilde_paths_are_in_the_remote_home(ssh_env, gpu_a, remote_scratch, tmp_path):
    local = tmp_path / "f"
    local.write_text("x")
    gpu_a.put_file(local, "~/{}/f".format(remote_scratch.name))
    assert (remote_scratch / "f").read_text() == "x"
    assert gpu_a.run(["cat", "{}/f".format(remote_scratch.name)]).stdout == b"x"  # cwd is home


@pytest.fixture
def ssh_agent(tmp_path, monkeypatch):
    """A real ssh-agent in the foreground (so we own its pid), empty, on a private socket."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        agent.kill()
        agent.wait()


def test_agent_keys_and_identities_only(ssh_env, ssh_agent, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))            # no default ~/.ssh/id_* keys
    encrypted = tmp_path / "id_encrypted"
    shutil.copyfile(ssh_env.key_path, encrypted)
    shutil.copyfile(str(ssh_env.key_path) + ".pub", str(encrypted) + ".pub")
    os.chmod(encrypted, 0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "secret", "-f", str(encrypted)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ssh-add", "-q", str(ssh_env.key_path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = ssh_env.write_config("agent", (
        "Host gpu-agent\n  HostName 127.0.0.1\n  Port {pa}\n  User ledgertest\n\n"
        "Host gpu-encrypted\n  HostName 127.0.0.1\n  Port {pa}\n  User ledgertest\n"
        "  IdentityFile {enc}\n  IdentitiesOnly yes\n\n"
        "Host gpu-only\n  HostName 127.0.0.1\n  Port {pa}\n  User ledgertest\n"
        "  IdentityFile {bad}\n  IdentitiesOnly yes\n").format(
            pa=ssh_env.port_a, enc=encrypted, bad=ssh_env.unauthorized_key_path))

    def reach(alias, **kw):
        with SshTransport.connect(alias, config_path=config,
                                  known_hosts=ssh_env.known_hosts_path, **kw) as transport:
            return transport.run(["echo", "in"]).stdout

    assert reach("gpu-agent") == b"in\n"            # the agent's key, no IdentityFile
    assert reach("gpu-encrypted") == b"in\n"        # encrypted file, unlocked via the agent
    with pytest.raises(TransportError) as error:    # IdentitiesOnly: the agent key is not offered
        reach("gpu-only")
    assert one_line(error).endswith("(tried keys: {})".format(ssh_env.unauthorized_key_path))
    with pytest.raises(TransportError, match="tried keys: none found"):
        reach("gpu-agent", allow_agent=False)
    subprocess.run(["ssh-add", "-q", "-D"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with pytest.raises(TransportError) as error:    # encrypted and no longer in the agent
        reach("gpu-encrypted")
    assert "id_encrypted (passphrase-protected, not in the agent)" in one_line(error)


def test_non_ssh_server_that_hangs_up(ssh_env):
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)
        config = alias_config(ssh_env, "gpu-rude", port=rude.getsockname()[1])
        hang_up = threading.Thread(target=lambda: rude.accept()[0].close())
        hang_up.start()
        with pytest.raises(TransportError) as error:
            SshTransport.connect("gpu-rude", config_path=config, known_hosts=ssh_env.known_hosts_path)
        hang_up.join()
    assert one_line(error).endswith("failed: the server closed the connection without an SSH greeting")
