"""Every attack of the threat model (attacks.py), as root (this process) and as an ordinary user (a subprocess
dropped to ``nobody``): no effect outside the sandbox, the trainer alive, reward 0 for wrong code, nothing left in
/tmp or /dev/shm."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from ptkernels.trainers.rewards import sandbox as S

from . import attacks
from .marks import needs_bwrap

pytestmark = needs_bwrap
REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture
def scratch():
    """A directory anyone may write: only the sandbox stands between it and the run."""
    d = tempfile.mkdtemp(prefix="ptk-attack-scratch-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("attack", attacks.ALL, ids=lambda a: a.__name__)
def test_attack_as_this_user(attack, scratch):
    attack(scratch)
    assert S.run_python("print(6 * 7)").stdout == "42\n"  # the sandbox (and this process) still work


def _unprivileged_python() -> str | None:
    """An interpreter ``nobody`` can run (a pyenv/conda one under /root may not be): the system one first."""
    for path in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", sys.executable):
        probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", path, "-c", "0"],
                               capture_output=True)
        if probe.returncode == 0:
            return path
    return None


# The subprocess imports the sandbox and verifiers without ptkernels/__init__ (which needs torch): the two
# packages are stubbed with their paths, so only the stdlib-only trainers modules load.
_BOOT = """
import runpy, sys, types
repo, scratch, attacks = sys.argv[1:4]
for name, path in (("ptkernels", repo + "/ptkernels"), ("ptkernels.trainers", repo + "/ptkernels/trainers")):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
sys.argv = [attacks, scratch]
runpy.run_path(attacks, run_name="__main__")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root (as non-root, the test above is it)")
def test_attacks_as_an_ordinary_user():
    python = _unprivileged_python()
    if python is None or shutil.which("setpriv") is None:
        pytest.skip("no interpreter that nobody can run")
    # A world-readable copy of what the subprocess imports (the checkout may sit under a private home).
    copy = tempfile.mkdtemp(prefix="ptk-attack-src-")
    scratch = tempfile.mkdtemp(prefix="ptk-attack-scratch-")
    try:
        shutil.copytree(REPO / "ptkernels" / "trainers", os.path.join(copy, "ptkernels", "trainers"),
                        ignore=shutil.ignore_patterns("__pycache__", "assets"))
        shutil.copy(pathlib.Path(attacks.__file__), copy)
        for root, _, files in os.walk(copy):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        os.chmod(copy, 0o755)
        shutil.chown(scratch, "nobody", "nogroup")
        res = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", python, "-I",
             "-c", _BOOT, copy, scratch, os.path.join(copy, "attacks.py")],
            capture_output=True, text=True, timeout=300, cwd="/", env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert set(lines) == {a.__name__ for a in attacks.ALL}, (res.stdout, res.stderr[-3000:])
    failed = {name: outcome for name, outcome in lines.items() if outcome != "ok"}
    assert not failed, (failed, res.stderr[-3000:])
