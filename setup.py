"""Only here so setuptools runs the cffi builder for the native module."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
