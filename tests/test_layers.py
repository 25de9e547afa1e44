"""The import contract (pyproject.toml, [tool.importlinter]): layers import downward only, no cycles.

import-linter finds a package's modules under its folder; attncc maps attncc.passes, attncc.patterns and
attncc.codegen to top-level folders (pyproject's package-dir), so the test lays the package out as it is
installed, then lints that copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_downward(tmp_path):
    pytest.importorskip("importlinter")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = tmp_path / "attncc"
    shutil.copytree(ROOT / "attncc", package, ignore=ignore)
    for folder in ("passes", "patterns", "codegen"):
        shutil.copytree(ROOT / folder, package / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = len(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert f"Contracts: {contracts} kept, 0 broken" in result.stdout, result.stdout


def test_every_package_folder_is_installed():
    """pyproject lists the packages a wheel installs; a variant folder left out would import here (the
    checkout is on the path) and be missing from an installed wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"attncc"}
    for folder, name in (("attncc", "attncc"), ("passes", "attncc.passes"), ("patterns", "attncc.patterns"),
                         ("codegen", "attncc.codegen")):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found == listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}; " \
                            f"remove: {sorted(listed - found)}"


def test_every_kernel_module_allocates_through_the_poisoned_allocator():
    """conftest.py fills every buffer a kernel launcher allocates with NaN by replacing
    `attncc.codegen.launch.alloc`; that needs every module with a Triton kernel to allocate through it."""
    import importlib
    import inspect
    import pkgutil

    import attncc.codegen.variants as variants
    from attncc.codegen import launch
    from conftest import _poisoned_alloc

    assert launch.alloc is _poisoned_alloc
    kernels = []
    for info in pkgutil.walk_packages(variants.__path__, variants.__name__ + "."):
        source = inspect.getsource(importlib.import_module(info.name))
        if "@triton.jit" in source:
            kernels.append(info.name)
            assert "launch.alloc(" in source and "torch.empty(" not in source, info.name
    assert len(kernels) >= 4, kernels
