"""A stand-in ``conda`` for launcher tests: a small bash script, no real conda needed.

``conda shell.bash hook`` prints a ``conda()`` shell function, like the real hook does.
Its ``activate ENV`` succeeds for every ENV that is a folder under ``envs_dir`` (and
exports CONDA_DEFAULT_ENV / CONDA_PREFIX) and otherwise fails with conda's
``EnvironmentNameNotFound`` message. Built with ``hook_works=False`` the hook defines no
function, so ``conda activate`` reaches the binary, which answers like conda >= 23 does
in an uninitialised shell: ``Run 'conda init' before 'conda activate'``. ``conda env list``
(and ``conda info --envs``) lists the environments in conda's own format.
"""

import os
import shlex
import stat
from dataclasses import dataclass
from typing import Iterable

_SCRIPT = r"""#!/usr/bin/env bash
# stand-in conda (tests/fixtures_conda.py)
envs_dir=@ENVS@
hook_works=@HOOK_WORKS@
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
case "$1 $2" in
"shell.bash hook")
    if [ "$hook_works" = 1 ]; then
        printf 'export CONDA_EXE=%q\n' "$self"
        printf '_fake_conda_envs=%q\n' "$envs_dir"
        cat <<'HOOK'
conda() {
    if [ "$1" = activate ]; then
        if [ -n "$2" ] && [ -d "$_fake_conda_envs/$2" ]; then
            export CONDA_DEFAULT_ENV="$2"
            export CONDA_PREFIX="$_fake_conda_envs/$2"
            export PATH="$CONDA_PREFIX/bin:$PATH"
            return 0
        fi
        printf '\nEnvironmentNameNotFound: Could not find conda environment: %s\n' "$2" >&2
        printf 'You can list all discoverable environments with `conda info --envs`.\n\n' >&2
        return 1
    fi
    "$CONDA_EXE" "$@"
}
HOOK
    else
        printf 'export PATH=%q:"$PATH"\n' "$(dirname "$self")"
    fi
    ;;
"env list"|"info --envs")
    # what conda >= 4.6 prints: a comment header, then "name [*] path" per env
    printf '# conda environments:\n#\n'
    printf '%-24s %s\n' base "$(dirname "$(dirname "$self")")"
    for d in "$envs_dir"/*/; do
        [ -d "$d" ] && printf '%-24s %s\n' "$(basename "$d")" "${d%/}"
    done
    ;;
activate*)
    printf '\nCondaError: Run '"'"'conda init'"'"' before '"'"'conda activate'"'"'\n\n' >&2
    exit 1
    ;;
*)
    echo "stand-in conda: $*"
    ;;
esac
"""


@dataclass(frozen=True)
class FakeConda:
    """Where the stand-in lives: ``binary`` is the ``conda`` script, envs are folders."""

    binary: str
    envs_dir: str

    @property
    def bin_dir(self):
        return os.path.dirname(self.binary)


def make_fake_conda(root, envs: Iterable[str] = ("torch",), hook_works: bool = True) -> FakeConda:
    """Install a stand-in conda at ``<root>/bin/conda`` with the named environments."""
    root = str(root)
    envs_dir = os.path.join(root, "envs")
    for env in envs:
        os.makedirs(os.path.join(envs_dir, env, "bin"), exist_ok=True)
    os.makedirs(envs_dir, exist_ok=True)
    binary = os.path.join(root, "bin", "conda")
    os.makedirs(os.path.dirname(binary), exist_ok=True)
    text = _SCRIPT.replace("@ENVS@", shlex.quote(envs_dir)).replace("@HOOK_WORKS@", "1" if hook_works else "0")
    with open(binary, "w") as fh:
        fh.write(text)
    os.chmod(binary, stat.S_IRWXU)
    return FakeConda(binary=binary, envs_dir=envs_dir)
