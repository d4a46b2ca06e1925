"""Minimal setup.py shim. All metadata lives in pyproject.toml.

The ahead-of-time build hook of the native C++ engine (``RLKERNELS_BUILD_NATIVE=1``) is added here by the
native-engine issue; until then this file only exists so that ``pip install .`` works with old tooling too.
"""
from setuptools import setup

setup()
