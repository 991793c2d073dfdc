"""Shim for tools that need a setup.py, such as Dataflow's `--setup_file ./setup.py`.

All packaging metadata lives in pyproject.toml.
"""

from setuptools import setup

setup()
