"""Only here so setuptools runs the cffi builders for the native modules.

clusterfs._iscsi (iSCSI devices, linked with libiscsi) is built only where libiscsi's
development files are installed (tools/install.sh installs them); without it
everything else works and an iscsi:// device is refused with a one-line reason.
"""
import shutil
import subprocess

from setuptools import setup


def _have_libiscsi() -> bool:
    if shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "libiscsi"]).returncode == 0


modules = ["native/build.py:ffibuilder"]
if _have_libiscsi():
    modules.append("native/iscsi_build.py:ffibuilder")

setup(cffi_modules=modules)
