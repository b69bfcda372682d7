"""Build the optional C accelerator poolport.codec._cetf; all other metadata is in pyproject.toml.

``optional=True``: without a working compiler the install still succeeds and
poolport.codec.etf runs on its pure-Python codec.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("poolport.codec._cetf", ["poolport/codec/_cetf.c"], optional=True, extra_compile_args=["-O2"])
    ]
)
