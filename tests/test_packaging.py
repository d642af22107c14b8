"""A normal (non-editable) install: the package imports from the repository root and from anywhere else.

Run from the repository root, Python finds the source folder `modeling_titans/` before the installed copy, so
that folder must be the whole package; elsewhere the installed copy must be complete (its subpackages and the
preset files).
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.slow  # pip builds and installs the package (~30 s)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = (
    "import modeling_titans, modeling_titans.configuration, modeling_titans.tokenization, modeling_titans.hub_upload;"
    "from modeling_titans import TitansConfig;"
    "assert 'demo' in TitansConfig.available_presets();"
    "print(modeling_titans.__file__)"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package pip installs from the repository (no editable mode), in a folder of its own."""
    pytest.importorskip("setuptools")
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / "repo"  # pip builds in the source folder: a copy of it
    skipped = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "benchmarks", "runs")
    shutil.copytree(REPO, source, ignore=skipped)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    command += ["--target", str(target), str(source)]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return target


def import_from(cwd, installed_dir) -> subprocess.CompletedProcess:
    """`import modeling_titans` in a fresh interpreter that sees the installed copy and the dependencies, but not
    the editable install of the test environment (`-S`: no .pth files)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed_dir), sysconfig.get_paths()["purelib"]]))
    return subprocess.run([sys.executable, "-S", "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True)


def test_installed_package_imports_from_the_repository_root(installed):
    completed = import_from(REPO, installed)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == os.path.join(REPO, "modeling_titans", "__init__.py")


def test_installed_package_is_complete(installed, tmp_path):
    completed = import_from(tmp_path, installed)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == os.path.join(str(installed), "modeling_titans", "__init__.py")
