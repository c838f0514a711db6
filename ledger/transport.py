"""Reach a GPU host: run commands and copy files, on this machine or over SSH.

The command line on the laptop talks to a GPU host only through a ``Transport``. Two
implementations share one face: ``LocalTransport`` (subprocess and local copies) and
``SshTransport`` (paramiko). This is the only module that imports paramiko.

SSH follows the user's OpenSSH setup so that ``ledger`` reaches exactly the hosts ``ssh``
reaches: ``~/.ssh/config`` (with ``Include``, which paramiko ignores, expanded here),
``ProxyJump`` chains built from paramiko ``direct-tcpip`` channels (never by shelling out
to ``ssh``), identity files and the agent, and ``known_hosts`` (plain, ``[host]:port``,
hashed ``|1|`` and wildcard entries). Host keys are verified here rather than by a
paramiko policy so that an unknown or changed key gives a one-line message saying what to
do.

One ``SshTransport`` keeps one connection open for a whole CLI command; every ``run`` is
one channel on it and counts one round trip in ``commands_run``.

Paths given to a transport may start with ``~/``; relative paths are relative to the
home directory on both transports (as they are for ``ssh`` and ``sftp``), and commands run
in the home directory.
"""

import base64
import getpass
import glob
import hashlib
import io
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import paramiko

from .errors import HostKeyError, TransportError, UnknownHostError

# paramiko logs connection failures at ERROR; without a handler Python would print them
# to stderr next to our one-line message. Applications that configure logging still see them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

DEFAULT_TIMEOUT = 10.0
MAX_INCLUDE_DEPTH = 16          # OpenSSH's READCONF_MAX_DEPTH
MAX_JUMP_HOPS = 8
KEEPALIVE_SECONDS = 15
DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519", "~/.ssh/id_dsa")
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
SYSTEM_SSH_CONFIG = "/etc/ssh/ssh_config"
ACCEPT_HINT = "rerun with --accept-new-host-key to trust it, or add it with ssh-keyscan"

Command = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Result:
    """What a command left behind: its exit code and everything it printed."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(TransportError):
    """``run(..., check=True)`` saw a non-zero exit code; ``result`` holds the output."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


def command_text(argv_or_cmd: Command) -> str:
    """The shell text sent to the host: a list is quoted word by word, a str is sent as is
    (the caller quoted it)."""
    if isinstance(argv_or_cmd, str):
        return argv_or_cmd
    return shlex.join([str(arg) for arg in argv_or_cmd])


def short(text: str, limit: int = 80) -> str:
    """A command shortened to fit in a one-line message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_line(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def fingerprint(key) -> str:
    """OpenSSH's ``SHA256:<base64 without padding>`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def tilde(path: str) -> str:
    """``/home/me/.ssh/id`` -> ``~/.ssh/id`` for messages."""
    home = os.path.expanduser("~")
    if path == home or path.startswith(home.rstrip("/") + "/"):
        return "~" + path[len(home.rstrip("/")):]
    return path


def file_mode_for(local_mode: int) -> int:
    """Uploaded files stay private: 0700 if the owner could execute it, else 0600."""
    return 0o700 if local_mode & stat.S_IXUSR else 0o600


class Transport:
    """The face the CLI uses to reach a host; see ``LocalTransport`` and ``SshTransport``."""

    host = "local"

    def __init__(self):
        self.commands_run = 0

    def run(self, argv_or_cmd: Command, input: Optional[bytes] = None,
            timeout: Optional[float] = None, check: bool = False,
            retry_safe: bool = False) -> Result:
        raise NotImplementedError

    def put_file(self, local_path, remote_path, mode: int = 0o600) -> None:
        raise NotImplementedError

    def put_tree(self, local_dir, remote_dir, mode_dirs: int = 0o700) -> bool:
        raise NotImplementedError

    def get_file(self, remote_path, local_path) -> None:
        raise NotImplementedError

    def home(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _checked(self, result: Result, command: str, check: bool) -> Result:
        if check and not result.ok:
            detail = last_line(result.stderr)
            raise CommandFailed("{}: command failed with exit code {}: {}{}".format(
                self.host, result.returncode, short(command),
                ": " + detail if detail else ""), result)
        return result


# ---------------------------------------------------------------------------------------
# Local


class LocalTransport(Transport):
    """The GPU host is this machine: subprocesses and file copies, same behaviour as SSH."""

    host = "local"

    def run(self, argv_or_cmd, input=None, timeout=None, check=False, retry_safe=False):
        argv = ["bash", "-c", argv_or_cmd] if isinstance(argv_or_cmd, str) else [
            str(arg) for arg in argv_or_cmd]
        command = command_text(argv_or_cmd)
        self.commands_run += 1
        try:
            done = subprocess.run(argv, input=input or b"", capture_output=True,
                                  timeout=timeout, cwd=self.home())
        except subprocess.TimeoutExpired:
            raise TransportError("local: command timed out after {}s: {}".format(
                timeout, short(command))) from None
        except FileNotFoundError:
            # What a shell on the other side of ssh would say.
            done = subprocess.CompletedProcess(argv, 127, b"", "{}: command not found\n".format(
                argv[0]).encode())
        return self._checked(Result(done.returncode, done.stdout, done.stderr), command, check)

    def put_file(self, local_path, remote_path, mode=0o600):
        dest = self._path(remote_path)
        os.makedirs(os.path.dirname(dest) or ".", mode=0o700, exist_ok=True)
        tmp = "{}.tmp-{}".format(dest, secrets.token_hex(4))
        try:
            shutil.copyfile(local_path, tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except OSError as e:
            _remove_quietly(tmp)
            raise TransportError("local: cannot copy {} to {}: {}".format(
                local_path, dest, e.strerror or e)) from None

    def put_tree(self, local_dir, remote_dir, mode_dirs=0o700):
        dest = self._path(remote_dir).rstrip("/")
        tmp = "{}.tmp-{}".format(dest, secrets.token_hex(4))
        try:
            os.makedirs(os.path.dirname(dest) or ".", mode=0o700, exist_ok=True)
            shutil.copytree(local_dir, tmp, symlinks=True)
            _set_tree_modes(tmp, mode_dirs)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TransportError("local: cannot copy {} to {}: {}".format(
                local_dir, dest, e.strerror or e)) from None
        try:
            os.rename(tmp, dest)
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(dest):
                return False        # another uploader won; its copy stays
            raise TransportError("local: cannot rename {} to {}".format(tmp, dest)) from None

    def get_file(self, remote_path, local_path):
        source = self._path(remote_path)
        tmp = "{}.tmp-{}".format(local_path, secrets.token_hex(4))
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, local_path)
        except OSError as e:
            _remove_quietly(tmp)
            raise TransportError("local: cannot copy {} to {}: {}".format(
                source, local_path, e.strerror or e)) from None

    def home(self):
        return os.path.expanduser("~")

    def _path(self, path) -> str:
        path = os.path.expanduser(str(path))
        return path if os.path.isabs(path) else os.path.join(self.home(), path)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _set_tree_modes(root: str, mode_dirs: int) -> None:
    os.chmod(root, mode_dirs)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), mode_dirs)
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode_for(os.stat(path).st_mode))


# ---------------------------------------------------------------------------------------
# ssh_config: Include expansion, then paramiko's parser and lookup

_SETTING = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)$")


def expand_includes(path: str, base_dir: str, _stack: Tuple[str, ...] = ()) -> str:
    """The text of an ssh config with every ``Include`` replaced by the files it names.

    As in OpenSSH, relative include paths resolve against ``base_dir`` (``~/.ssh`` for the
    user's config, ``/etc/ssh`` for the system one), globs expand in sorted order and
    missing files are skipped. A file already being included (a loop) is skipped too.
    After an included file the enclosing ``Host``/``Match`` line is repeated so that the
    lines that follow stay in their block. One approximation: ``Host`` blocks inside a
    file included from within a non-matching block still apply on their own.
    """
    real = os.path.realpath(path)
    if real in _stack or len(_stack) >= MAX_INCLUDE_DEPTH:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TransportError("cannot read ssh config {}: {}".format(path, e.strerror or e)) from None
    out, header = [], "Host *"
    for line in lines:
        match = _SETTING.match(line)
        keyword = match.group(1).lower() if match else ""
        if keyword in ("host", "match"):
            header = line.strip()
        if keyword != "include":
            out.append(line)
            continue
        for pattern in _split_words(match.group(2)):
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(base_dir, pattern)
            for included in sorted(glob.glob(pattern)):
                if os.path.isfile(included):
                    out.append(expand_includes(included, base_dir, _stack + (real,)))
        out.append(header)
    return "\n".join(out) + "\n"


def _split_words(value: str) -> List[str]:
    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


def load_ssh_config(config_path: Optional[str] = None) -> "paramiko.SSHConfig":
    """The ssh config OpenSSH would use: ``config_path`` (or ``$LEDGER_SSH_CONFIG``) alone,
    like ``ssh -F``; otherwise ``~/.ssh/config`` followed by ``/etc/ssh/ssh_config``."""
    override = config_path or os.environ.get("LEDGER_SSH_CONFIG")
    user_ssh_dir = os.path.expanduser("~/.ssh")
    if override:
        override = os.path.expanduser(str(override))
        if not os.path.isfile(override):
            raise TransportError("ssh config {} does not exist".format(override))
        sources = [(override, user_ssh_dir)]
    else:
        sources = [(os.path.join(user_ssh_dir, "config"), user_ssh_dir),
                   (SYSTEM_SSH_CONFIG, os.path.dirname(SYSTEM_SSH_CONFIG))]
    texts = [expand_includes(path, base) for path, base in sources if os.path.isfile(path)]
    try:
        return paramiko.SSHConfig.from_text("Host *\n".join(texts))
    except paramiko.ssh_exception.ConfigParseError as e:
        raise TransportError("cannot parse ssh config {}: {}".format(sources[0][0], e)) from None


@dataclass
class Hop:
    """One SSH server on the way to the target, with the config that applies to it."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: List[str]
    identities_only: bool
    use_agent: bool
    connect_timeout: Optional[float]
    proxy_command: Optional[str]
    host_key_alias: Optional[str]
    user_known_hosts: List[str]
    global_known_hosts: List[str]
    hash_known_hosts: bool
    accept_new_from_config: bool
    explicit_identities: bool = False

    @property
    def address(self) -> str:
        return "{}@{}:{}".format(self.user, self.hostname, self.port)

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this server: ``host`` on port 22, else ``[host]:port``."""
        if self.host_key_alias:
            return self.host_key_alias
        if self.port == 22:
            return self.hostname
        return "[{}]:{}".format(self.hostname, self.port)


def _yes(options, key: str, default: str = "no") -> bool:
    return str(options.get(key, default)).lower() in ("yes", "true", "on")


def hop_from_config(config, name: str, user: Optional[str] = None,
                    port: Optional[int] = None) -> Hop:
    """Look ``name`` up as OpenSSH would; ``user``/``port`` from a ProxyJump spec win."""
    options = config.lookup(name)
    identity_files = list(options.get("identityfile") or [])
    timeout = options.get("connecttimeout")
    try:
        port = port or int(options.get("port", 22))
        timeout = float(timeout) if timeout else None
    except ValueError as e:
        raise TransportError("{}: bad Port or ConnectTimeout in ssh config: {}".format(name, e)) from None
    return Hop(
        alias=name,
        hostname=options["hostname"],
        port=port,
        user=user or options.get("user") or _local_user(),
        identity_files=[os.path.expanduser(p) for p in identity_files] or [
            os.path.expanduser(p) for p in DEFAULT_IDENTITY_FILES],
        explicit_identities=bool(identity_files),
        identities_only=_yes(options, "identitiesonly"),
        use_agent=str(options.get("identityagent", "")).lower() != "none",
        connect_timeout=timeout,
        proxy_command=options.get("proxycommand"),
        host_key_alias=options.get("hostkeyalias"),
        user_known_hosts=_known_hosts_paths(options.get("userknownhostsfile"),
                                            DEFAULT_USER_KNOWN_HOSTS),
        global_known_hosts=_known_hosts_paths(options.get("globalknownhostsfile"),
                                              DEFAULT_GLOBAL_KNOWN_HOSTS),
        hash_known_hosts=_yes(options, "hashknownhosts"),
        accept_new_from_config=str(options.get("stricthostkeychecking", "ask")).lower() in (
            "accept-new", "no", "off"),
    )


def _local_user() -> str:
    return getpass.getuser()


def _known_hosts_paths(value: Optional[str], default: Sequence[str]) -> List[str]:
    paths = _split_words(value) if value else list(default)
    return [os.path.expanduser(p) for p in paths if p.lower() != "none"]


def parse_jump(spec: str) -> Tuple[str, Optional[str], Optional[int]]:
    """``[user@]host[:port]`` or ``ssh://user@host:port`` -> (host, user, port)."""
    spec = spec.strip()
    if spec.startswith("ssh://"):
        spec = spec[len("ssh://"):]
    user, _, hostport = spec.rpartition("@")
    port = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host = hostport
    try:
        return host, user or None, int(port) if port else None
    except ValueError:
        raise TransportError("bad ProxyJump host {!r}".format(spec)) from None


def plan_route(config, name: str, user: Optional[str] = None, port: Optional[int] = None,
               jump: Optional[str] = None, _depth: int = 0) -> List[Hop]:
    """The hops from the first server dialled to ``name``, following ProxyJump.

    ``ProxyJump a,b`` reaches the target through b, and b through a, like ``ssh -J a,b``;
    the first hop of a list, or a single jump host, may have its own ProxyJump.
    """
    if _depth > MAX_JUMP_HOPS:
        raise TransportError("{}: ProxyJump chain longer than {} hops (a loop in the ssh config?)"
                             .format(name, MAX_JUMP_HOPS))
    hop = hop_from_config(config, name, user, port)
    spec = jump if jump is not None else config.lookup(name).get("proxyjump")
    if not spec or spec.strip().lower() == "none":
        return [hop]
    jumps = [part for part in spec.split(",") if part.strip()]
    jump_host, jump_user, jump_port = parse_jump(jumps[-1])
    upstream = ",".join(jumps[:-1]) if len(jumps) > 1 else None
    return plan_route(config, jump_host, jump_user, jump_port, upstream, _depth + 1) + [hop]


# ---------------------------------------------------------------------------------------
# known_hosts


@dataclass
class KnownKey:
    """One known_hosts line that names the server."""

    path: str
    lineno: int
    key: object
    marker: Optional[str] = None

    @property
    def where(self) -> str:
        return "{}:{}".format(tilde(self.path), self.lineno)


def _pattern_matches(pattern: str, name: str) -> bool:
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def host_field_matches(names_field: str, name: str) -> bool:
    """Does a known_hosts host field (hashed, a list, wildcards, ``!negation``) name ``name``?"""
    if names_field.startswith("|1|"):
        return paramiko.HostKeys.hash_host(name, names_field) == names_field
    matched = False
    for pattern in names_field.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, name):
            if negated:
                return False
            matched = True
    return matched


def known_keys(paths: Sequence[str], name: str) -> List[KnownKey]:
    """Every known_hosts entry for ``name`` in ``paths`` (missing files are skipped)."""
    found = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for lineno, line in enumerate(lines, 1):
            entry = _parse_known_line(line, name)
            if entry is not None:
                found.append(KnownKey(path, lineno, entry[1], entry[0]))
    return found


def _parse_known_line(line: str, name: str):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
    if len(fields) < 3 or not host_field_matches(fields[0], name):
        return None
    try:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(" ".join(fields[:3]))
    except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
        return None
    return None if entry is None else (marker, entry.key)


def remember_host_key(path: str, name: str, key, hashed: bool) -> None:
    """Append a known_hosts line for ``name`` (hashed if the config says HashKnownHosts)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    names = paramiko.HostKeys.hash_host(name) if hashed else name
    line = "{} {} {}\n".format(names, key.get_name(), key.get_base64())
    needs_newline = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(("\n" if needs_newline else "") + line)


# ---------------------------------------------------------------------------------------
# SSH


class _Dropped(Exception):
    """The connection died under a command (internal; becomes a TransportError)."""


class SshTransport(Transport):
    """A GPU host reached over SSH: one paramiko connection (through any jump hosts) for
    the whole CLI command; a channel per ``run``; sftp opened once when first needed."""

    def __init__(self, alias: str, route: List[Hop], known_hosts: Optional[str] = None,
                 accept_new_host_key: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 allow_agent: bool = True):
        super().__init__()
        self.host = alias
        self.route = route
        self.known_hosts = known_hosts
        self.accept_new_host_key = accept_new_host_key
        self.timeout = timeout
        self.allow_agent = allow_agent
        self.reconnects = 0
        self._transports: List[paramiko.Transport] = []
        self._sftp = None
        self._home: Optional[str] = None
        self._agent = None

    @classmethod
    def connect(cls, alias: str, config_path=None, known_hosts=None,
                accept_new_host_key: bool = False, timeout: float = DEFAULT_TIMEOUT,
                allow_agent: bool = True) -> "SshTransport":
        """Open the connection to ``alias`` as the ssh config describes it.

        ``known_hosts`` (or ``$LEDGER_KNOWN_HOSTS``) replaces the known_hosts files of the
        config; ``timeout`` applies where the config sets no ConnectTimeout.
        """
        config = load_ssh_config(config_path)
        route = plan_route(config, alias)
        known_hosts = known_hosts or os.environ.get("LEDGER_KNOWN_HOSTS")
        transport = cls(alias, route, str(known_hosts) if known_hosts else None,
                        accept_new_host_key, timeout, allow_agent)
        try:
            transport._open()
        except BaseException:
            transport.close()
            raise
        return transport

    # -- naming, for messages ---------------------------------------------------------

    @property
    def label(self) -> str:
        """``gpu-b (via gpu-a)``: the target and the jump hosts in front of it."""
        jumps = [hop.alias for hop in self.route[:-1]]
        return self.host + (" (via {})".format(", ".join(jumps)) if jumps else "")

    def _where(self, hop: Hop) -> str:
        suffix = "" if hop is self.route[-1] else " (jump host {})".format(hop.alias)
        return hop.address + suffix

    def _fail(self, hop: Hop, problem: str) -> TransportError:
        return TransportError("{}: {}".format(self.label, problem.replace("{where}", self._where(hop))))

    # -- connecting ---------------------------------------------------------------------

    def _open(self) -> None:
        transports = []
        try:
            for index, hop in enumerate(self.route):
                upstream = (self.route[index - 1], transports[-1]) if transports else None
                sock = self._open_socket(hop, upstream)
                transport = self._handshake(hop, sock)
                transports.append(transport)
                self._verify_host_key(hop, transport)
                self._authenticate(hop, transport)
        except BaseException:
            for transport in reversed(transports):
                transport.close()
            raise
        for transport in transports:
            transport.set_keepalive(KEEPALIVE_SECONDS)
        self._transports = transports

    def _hop_timeout(self, hop: Hop) -> float:
        return hop.connect_timeout or self.timeout

    def _open_socket(self, hop: Hop, upstream):
        """A byte pipe to the hop: TCP, a ProxyCommand, or a channel through the previous
        hop's connection (``upstream`` = (previous hop, its paramiko transport))."""
        target = "{}:{}".format(hop.hostname, hop.port)
        timeout = self._hop_timeout(hop)
        if upstream is not None:
            jump, jump_transport = upstream
            try:
                return jump_transport.open_channel("direct-tcpip", (hop.hostname, hop.port),
                                                   ("127.0.0.1", 0), timeout=timeout)
            except paramiko.ChannelException as e:
                raise self._fail(hop, "jump host {} could not connect to {} ({})".format(
                    jump.alias, target, e.text)) from None
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise self._fail(hop, "jump host {} dropped the tunnel to {} ({})".format(
                    jump.alias, target, e or type(e).__name__)) from None
        if hop.proxy_command:
            try:
                return paramiko.ProxyCommand("/bin/sh -c " + shlex.quote("exec " + hop.proxy_command))
            except (paramiko.SSHException, OSError) as e:
                raise self._fail(hop, "ProxyCommand for {where} failed: " + str(e)) from None
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=timeout)
        except socket.gaierror as e:
            raise UnknownHostError(str(self._fail(hop, "cannot resolve host name {} ({}); is the alias in "
                                                       "~/.ssh/config?".format(hop.hostname, e.strerror)))) from None
        except socket.timeout:
            raise self._fail(hop, "timed out after {:g}s connecting to {}".format(
                timeout, target)) from None
        except ConnectionRefusedError:
            raise self._fail(hop, "connection refused by {}".format(target)) from None
        except OSError as e:
            raise self._fail(hop, "cannot connect to {}: {}".format(target, e.strerror or e)) from None

    def _handshake(self, hop: Hop, sock) -> "paramiko.Transport":
        timeout = self._hop_timeout(hop)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        self._prefer_known_key_types(hop, transport)
        reason, started = None, time.monotonic()
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            reason = str(e) or type(e).__name__
        # start_client returns quietly when its timeout passes: check the key exchange.
        if reason is None and transport.is_active() and transport.initial_kex_done:
            return transport
        transport.close()
        timed_out = time.monotonic() - started >= timeout * 0.9
        if not getattr(transport, "remote_version", ""):
            reason = ("no SSH server answered within {:g}s".format(timeout) if timed_out
                      else "the server closed the connection without an SSH greeting")
        elif reason is None:
            reason = "key exchange did not finish within {:g}s".format(timeout)
        raise self._fail(hop, "SSH handshake with {where} failed: " + reason)

    def _known_hosts_files(self, hop: Hop) -> Tuple[List[str], str]:
        """(files to look keys up in, file to append accepted keys to)."""
        if self.known_hosts:
            return [self.known_hosts], self.known_hosts
        user_files = hop.user_known_hosts or [os.path.expanduser(DEFAULT_USER_KNOWN_HOSTS[0])]
        return user_files + hop.global_known_hosts, user_files[0]

    def _prefer_known_key_types(self, hop: Hop, transport) -> None:
        """Ask for a host key type known_hosts already has, as OpenSSH does, so a host
        known by its RSA key is not reported as unknown because it also has ed25519."""
        files, _ = self._known_hosts_files(hop)
        known = {k.key.get_name() for k in known_keys(files, hop.known_hosts_name) if not k.marker}
        if not known:
            return
        options = transport.get_security_options()
        wanted = set(known)
        if "ssh-rsa" in known:
            wanted |= {"rsa-sha2-512", "rsa-sha2-256"}
        first = [t for t in options.key_types if t in wanted]
        options.key_types = first + [t for t in options.key_types if t not in wanted]

    def _verify_host_key(self, hop: Hop, transport) -> None:
        key = transport.get_remote_server_key()
        files, append_to = self._known_hosts_files(hop)
        entries = known_keys(files, hop.known_hosts_name)
        name, offered = hop.known_hosts_name, "{} {}".format(key.get_name(), fingerprint(key))
        which = name if hop is self.route[-1] else "{} (jump host {})".format(name, hop.alias)
        if any(e.marker == "@revoked" and e.key.asbytes() == key.asbytes() for e in entries):
            raise HostKeyError("{}: host key {} for {} is marked @revoked in known_hosts".format(
                self.label, offered, name))
        entries = [e for e in entries if not e.marker]
        same_type = [e for e in entries if e.key.get_name() == key.get_name()]
        if any(e.key.asbytes() == key.asbytes() for e in same_type):
            return
        if same_type:
            old = same_type[0]
            raise HostKeyError(
                "{}: WARNING: HOST KEY CHANGED for {}: the server offers {} but {} has {}; "
                "someone may be intercepting the connection - refusing to connect; if the "
                "change is expected, remove the old key with: ssh-keygen -R {}{}".format(
                    self.label, which, offered, old.where, fingerprint(old.key),
                    shlex.quote(name),
                    "" if append_to == os.path.expanduser(DEFAULT_USER_KNOWN_HOSTS[0])
                    else " -f " + shlex.quote(append_to)))
        if self.accept_new_host_key or hop.accept_new_from_config:
            remember_host_key(append_to, name, key, hop.hash_known_hosts)
            return
        other_types = sorted({e.key.get_name() for e in entries})
        raise HostKeyError("{}: unknown host key for {}: {}{}; {} -p {} {} >> {}".format(
            self.label, which, offered,
            " (known_hosts has only {})".format(", ".join(other_types)) if other_types else "",
            ACCEPT_HINT, hop.port, hop.hostname, tilde(append_to)))

    def _agent_keys(self) -> list:
        if not self.allow_agent:
            return []
        if self._agent is None:
            try:
                self._agent = paramiko.Agent()
            except (paramiko.SSHException, OSError):
                return []
        try:
            return list(self._agent.get_keys())
        except (paramiko.SSHException, OSError):
            return []

    def _auth_candidates(self, hop: Hop):
        """Keys to offer, in order: identity files (via the agent when it holds them),
        then the agent's other keys unless IdentitiesOnly. Also the files skipped, and why."""
        agent_keys = self._agent_keys() if hop.use_agent else []
        by_blob = {k.asbytes(): k for k in agent_keys}
        candidates, skipped, used = [], [], set()
        for path in hop.identity_files:
            shown = tilde(path)
            if not os.path.exists(path):
                if hop.explicit_identities:
                    skipped.append(shown + " (missing)")
                continue
            agent_key = by_blob.get(_public_blob(path + ".pub"))
            if agent_key is not None:
                candidates.append((shown + " (agent)", agent_key))
                used.add(agent_key.asbytes())
                continue
            try:
                key = paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError) as e:
                # paramiko 3-5 let cryptography's TypeError through for encrypted
                # OpenSSH-format keys instead of raising PasswordRequiredException.
                if isinstance(e, TypeError) and "password" not in str(e).lower():
                    raise
                skipped.append(shown + " (passphrase-protected, not in the agent)")
                continue
            except (paramiko.SSHException, OSError, ValueError) as e:
                skipped.append("{} (unreadable: {})".format(shown, e))
                continue
            _load_certificate(key, path)
            candidates.append((shown, key))
        if not hop.identities_only:
            for key in agent_keys:
                if key.asbytes() not in used:
                    candidates.append(("agent key {}".format(
                        getattr(key, "comment", "") or fingerprint(key)), key))
        return candidates, skipped

    def _authenticate(self, hop: Hop, transport) -> None:
        candidates, skipped = self._auth_candidates(hop)
        tried = []
        for shown, key in candidates:
            tried.append(shown)
            try:
                remaining = transport.auth_publickey(hop.user, key)
            except paramiko.BadAuthenticationType as e:
                raise self._fail(hop, "{where} does not accept public keys (it allows: %s)"
                                 % ", ".join(e.allowed_types)) from None
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, EOFError, OSError):
                break       # the server hung up, e.g. after MaxAuthTries
            if transport.is_authenticated():
                return
            raise self._fail(hop, "{where} accepted key %s but also wants %s, which ledger "
                                  "cannot do without a terminal" % (shown, ", ".join(remaining)))
        raise self._fail(hop, "authentication failed for {where} (tried keys: %s)" % (
            ", ".join(tried + skipped) or "none found; set IdentityFile in ~/.ssh/config"))

    def _close_connection(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                pass
            self._sftp = None
        for transport in reversed(self._transports):
            transport.close()
        self._transports = []

    def _reconnect(self) -> None:
        self._close_connection()
        self.reconnects += 1
        self._open()

    @property
    def connected(self) -> bool:
        return bool(self._transports) and all(t.is_active() for t in self._transports)

    def _ensure_connected(self) -> "paramiko.Transport":
        """The live connection; a dead one is replaced first (nothing was sent on it
        yet for the current operation, so this is always safe)."""
        if not self.connected:
            self._reconnect()
        return self._transports[-1]

    def close(self) -> None:
        self._close_connection()
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    # -- commands -----------------------------------------------------------------------

    def run(self, argv_or_cmd, input=None, timeout=None, check=False, retry_safe=False):
        """Run one command in the remote login shell; ``retry_safe`` (the caller says the
        command is idempotent) reconnects once and reruns it if the connection drops."""
        command = command_text(argv_or_cmd)
        attempts = 2 if retry_safe else 1
        for attempt in range(attempts):
            try:
                result = self._exec(self._ensure_connected(), command, input, timeout)
                return self._checked(result, command, check)
            except _Dropped:
                if attempt + 1 == attempts:
                    raise TransportError("connection to {} dropped while running {}".format(
                        self.label, short(command))) from None
                self._close_connection()
        raise AssertionError("unreachable")

    def _exec(self, transport, command: str, input: Optional[bytes],
              timeout: Optional[float]) -> Result:
        channel = None
        try:
            channel = transport.open_session(timeout=self.timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError):
            if channel is not None:
                channel.close()
            raise _Dropped() from None
        self.commands_run += 1
        try:
            return self._collect(transport, channel, command, input, timeout)
        finally:
            channel.close()

    def _collect(self, transport, channel, command, input, timeout) -> Result:
        """Feed stdin and drain stdout/stderr concurrently (no deadlock on big outputs)."""
        stdout, stderr = bytearray(), bytearray()
        readers = [threading.Thread(target=_drain, args=(channel.recv, stdout), daemon=True),
                   threading.Thread(target=_drain, args=(channel.recv_stderr, stderr), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            if input:
                channel.sendall(input)
            channel.shutdown_write()
        except (OSError, paramiko.SSHException, EOFError):
            pass    # the command stopped reading or the connection died; seen below
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(reader.is_alive() for reader in readers) or not channel.status_event.wait(
                None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise TransportError("{}: command timed out after {}s: {}".format(
                self.label, timeout, short(command)))
        if channel.exit_status == -1 and self._died(transport):
            raise _Dropped()
        # -1 with a live connection: killed by a signal (paramiko does not report which).
        return Result(channel.exit_status, bytes(stdout), bytes(stderr))

    def _died(self, transport) -> bool:
        # paramiko closes channels before it marks the transport inactive, so also look
        # at the exception its reader thread saved.
        return not transport.is_active() or transport.saved_exception is not None or any(
            not t.is_active() for t in self._transports)

    # -- files --------------------------------------------------------------------------

    def home(self) -> str:
        if self._home is None:
            self._home = self.run('printf %s "$HOME"', check=True, retry_safe=True).stdout.decode()
        return self._home

    def _remote(self, path) -> str:
        path = str(path)
        if path == "~" or path.startswith("~/"):
            return self.home() + path[1:]
        return path

    def _sftp_client(self):
        transport = self._ensure_connected()
        if self._sftp is None or self._sftp.get_channel().closed:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise TransportError("{}: cannot start sftp: {}".format(self.label, e)) from None
        return self._sftp

    def put_file(self, local_path, remote_path, mode=0o600):
        """Upload to a temporary name, set the mode, then rename over ``remote_path``:
        readers never see a half-written or wrongly-permissioned file."""
        dest = self._remote(remote_path)
        tmp = "{}.tmp-{}".format(dest, secrets.token_hex(4))
        sftp = self._sftp_client()
        try:
            try:
                sftp.put(str(local_path), tmp)
            except FileNotFoundError:
                if not os.path.exists(str(local_path)):
                    raise
                self._mkdirs(sftp, _posix_dirname(dest))
                sftp.put(str(local_path), tmp)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, dest)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise TransportError("{}: cannot upload {} to {}: {}".format(
                self.label, local_path, dest, _reason(e))) from None

    def _mkdirs(self, sftp, path: str) -> None:
        """``mkdir -p`` with mode 0700 for the directories it creates."""
        missing = []
        while path not in ("", "/", "."):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = _posix_dirname(path)
        for directory in reversed(missing):
            sftp.mkdir(directory, 0o700)
            sftp.chmod(directory, 0o700)

    def get_file(self, remote_path, local_path):
        source = self._remote(remote_path)
        tmp = "{}.tmp-{}".format(local_path, secrets.token_hex(4))
        try:
            self._sftp_client().get(source, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, str(local_path))
        except (OSError, paramiko.SSHException, EOFError) as e:
            _remove_quietly(tmp)
            raise TransportError("{}: cannot download {} to {}: {}".format(
                self.label, source, local_path, _reason(e))) from None

    def put_tree(self, local_dir, remote_dir, mode_dirs=0o700):
        """Upload a directory in one round trip (a tar stream into one remote command),
        unpacked beside ``remote_dir`` and renamed into place; if ``remote_dir`` already
        exists another uploader won, so its copy stays and ours is removed.
        Returns True if this call installed the tree."""
        dest = self._remote(remote_dir).rstrip("/")
        tmp = "{}.tmp-{}".format(dest, secrets.token_hex(4))
        archive = _tar_tree(str(local_dir), mode_dirs)
        script = (
            "set -e; umask 077; mkdir -p -- {parent}; mkdir -m {mode:o} -- {tmp}; "
            "tar -x --no-same-owner -f - -C {tmp}; "
            "if mv -T -- {tmp} {dest} 2>/dev/null; then echo installed; "
            "elif [ -d {dest} ]; then rm -rf -- {tmp}; echo existed; "
            "else rm -rf -- {tmp}; echo 'cannot rename into place' >&2; exit 1; fi"
        ).format(parent=shlex.quote(_posix_dirname(dest) or "."), mode=mode_dirs,
                 tmp=shlex.quote(tmp), dest=shlex.quote(dest))
        result = self.run(script, input=archive)
        if not result.ok:
            raise TransportError("{}: cannot upload {} to {}: {}".format(
                self.label, local_dir, dest, last_line(result.stderr) or
                "exit code {}".format(result.returncode)))
        return result.stdout.strip() == b"installed"


def _drain(recv, sink: bytearray) -> None:
    while True:
        try:
            chunk = recv(65536)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not chunk:
            return
        sink.extend(chunk)


def _posix_dirname(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] or ("/" if path.startswith("/") else "")


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _public_blob(pub_path: str) -> Optional[bytes]:
    """The key blob of an OpenSSH ``.pub`` file, to find the same key in the agent."""
    try:
        with open(pub_path) as f:
            fields = f.read().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError):
        return None


def _load_certificate(key, path: str) -> None:
    cert = path + "-cert.pub"
    if os.path.exists(cert):
        try:
            key.load_certificate(cert)
        except (ValueError, OSError, paramiko.SSHException):
            pass


def _tar_tree(local_dir: str, mode_dirs: int) -> bytes:
    """An in-memory tar of ``local_dir`` with private modes and no owner names."""
    if not os.path.isdir(local_dir):
        raise TransportError("cannot upload {}: not a directory".format(local_dir))

    def private(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if info.isdir():
            info.mode = mode_dirs
        elif info.isfile():
            info.mode = file_mode_for(info.mode)
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(local_dir)):
            tar.add(os.path.join(local_dir, name), arcname=name, filter=private)
    return buffer.getvalue()


def open_transport(host: Optional[str], **kw) -> Transport:
    """``None`` or ``"local"`` -> this machine; anything else is an ssh alias or host."""
    if host is None or host == "local":
        return LocalTransport()
    return SshTransport.connect(host, **kw)
