"""The remote workflow end to end: the real `ledger` CLI on the "laptop" (the user running
pytest) against a "GPU host" reached through the real OpenSSH servers of fixtures_ssh
(user ``ledgertest``, its own home, ssh_config aliases, gpu-b behind gpu-a by ProxyJump).

Every remote ledger lives in a scratch folder of the test user's home; the bundle goes
to the real ``~/.ledger/bundle/<key>/`` there.
"""

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import _stop_scheduler, wait_for
from fixtures_conda import make_fake_conda
from fixtures_ssh import ssh_env  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

LEDGER = [sys.executable, "-m", "ledger.cli.main"]


@dataclass
class Host:
    """The test user's side (scratch folder, stand-in conda) and the laptop's environment."""

    env: object                 # the SshEnv
    scratch: Path               # in the test user's home, owned by it
    conda: str                  # the stand-in conda binary, runnable by the test user
    laptop_env: dict
    laptop: Path

    def ledger(self, *args, check=True, timeout=150):
        res = subprocess.run(LEDGER + [str(a) for a in args], capture_output=True, text=True,
                             timeout=timeout, env=self.laptop_env, cwd=str(self.laptop))
        if check and res.returncode != 0:
            raise AssertionError("ledger %s failed (%d):\n%s\n%s" % (
                " ".join(map(str, args)), res.returncode, res.stdout, res.stderr))
        return res

    def folder(self, name):
        """A fresh folder owned by the test user: (its path, the ledger path in it)."""
        path = self.scratch / name
        self.env.run_as_user("mkdir -p -m 700 %s/work" % path)
        return path, path / "ledger" / "ledger.db"

    def manifest(self, name, text, **fmt):
        path = self.laptop / ("%s.yaml" % name)
        path.write_text(textwrap.dedent(text).format(conda=self.conda, **fmt))
        return path


def chown_tree(path, uid, gid):
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in files:
            os.chown(os.path.join(root, name), uid, gid)


@pytest.fixture(scope="module")
def host(ssh_env, tmp_path_factory):  # noqa: F811
    scratch = ssh_env.home / ("lt-remote-" + secrets.token_hex(4))
    ssh_env.run_as_user("mkdir -m 700 %s" % scratch)
    fake = make_fake_conda(scratch / "conda", envs=("torch",))
    gid = os.stat(ssh_env.home).st_gid
    chown_tree(str(scratch / "conda"), ssh_env.uid, gid)
    laptop = tmp_path_factory.mktemp("laptop")
    known_hosts = laptop / "known_hosts"
    shutil.copyfile(ssh_env.known_hosts_path, known_hosts)
    env = dict(os.environ, LEDGER_SSH_CONFIG=str(ssh_env.config_path),
               LEDGER_KNOWN_HOSTS=str(known_hosts), LEDGER_HOME=str(laptop / "dot-ledger"))
    env.pop("LEDGER_DB", None)
    h = Host(ssh_env, scratch, fake.binary, env, laptop)
    try:
        yield h
    finally:
        for db in scratch.glob("*/ledger/ledger.db"):
            _stop_scheduler(str(db))
        shutil.rmtree(scratch, ignore_errors=True)


SWEEP = """\
project: {project}
cwd: ~/{cwd}
ssh: gpu-a
conda: torch
conda_hook: {conda}
gpu_provider: sim:2x80G,lag=0.3
launcher: screen
gpu_free_threshold_mib: 500
stale_grace: 2
grid:
  seed: [{seeds}]
template:
  id: "s${{seed}}"
  cmd: python3 -m ledger.sim job --mem 20000 --seconds {seconds} --out results/s${{seed}}.json
  output_check: results/s${{seed}}.json
"""


def run_of(stdout):
    return stdout.split("run ", 1)[1].split()[0]


def host_state(db):
    from ledger.store import open_store
    with open_store(str(db), readonly=True) as store:
        return store.state()


def host_events(db, kinds=None):
    from ledger.store import open_store
    with open_store(str(db), readonly=True) as store:
        return list(store.read(kinds=kinds))


def test_submit_runs_to_completion_while_the_laptop_is_away(host):
    folder, db = host.folder("complete")
    m = host.manifest("complete", SWEEP, project="complete", cwd=folder.relative_to(host.env.home) / "work",
                      seeds="0, 1, 2", seconds=1)
    out = host.ledger("--db", db, "submit", m, "--host", "gpu-a")
    run = run_of(out.stdout)
    assert "submitted run %s (3 jobs) on gpu-a" % run in out.stdout
    st = wait_for(lambda: host_state(db).runs[run].finished and host_state(db), timeout=90,
                  what="the run to finish on the host")
    assert st.runs[run].counts()["completed"] == 3
