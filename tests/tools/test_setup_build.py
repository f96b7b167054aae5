"""`python setup.py build_ext` asked for by hand fails loudly (non-zero, saying what is missing) when the native
extension cannot be built; pip's own builds only warn (the extension is optional)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_ext_without_pybind11_says_so_and_fails(tmp_path):
    fake = tmp_path / "fake"
    (fake / "pybind11").mkdir(parents=True)
    (fake / "pybind11" / "__init__.py").write_text("raise ImportError('no pybind11 here (test)')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    assert "pybind11 is not installed" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "lib").exists() or not list((tmp_path / "lib").rglob("_C*"))
