"""Build script.

Everything installable lives in pyproject.toml. This file exists so that `pip install -e .` keeps working
on any setuptools, and so that the optional native extension (csrc/, its own issue) has one place to be
declared. The package itself is pure Python + Triton and installs on a CPU-only machine.
"""

from setuptools import setup

setup()
