"""Build the optional C accelerator poolport._cetf; all other metadata is in pyproject.toml.

``optional=True``: without a working compiler the install still succeeds and
poolport.etf runs on its pure-Python codec.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("poolport._cetf", ["poolport/_cetf.c"], optional=True, extra_compile_args=["-O2"])])
