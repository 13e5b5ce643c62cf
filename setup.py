"""Packaging lives in pyproject.toml; this file exists for the optional extension prebuild."""

from setuptools import setup

setup()
