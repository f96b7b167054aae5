"""The README's Python blocks run as written: each in a fresh interpreter, in an empty folder (the Trainer block
writes out/), with this checkout first on the path. A block that fails shows its own traceback."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "0"}
    # timeout: a guard against a hang, not a speed assertion (the blocks take seconds on an idle CPU)
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"README python block {index + 1} failed:\n{BLOCKS[index]}\n{done.stderr[-4000:]}"
