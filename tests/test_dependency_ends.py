"""The oldest end of each tested dependency range, in a throwaway venv (slow: `pytest -m slow`).

setup.py's test extra bounds transformers and triton to ranges the project claims to support. The
default test run exercises whatever pip resolved (the newest end); these tests install the OLDEST
version of each range into a fresh venv that otherwise sees this interpreter's packages (torch,
the editable gptfast, ...) and run the suites that depend on it there, so "5.23 and 5.24" and
"triton 3.6 (the GPU machines')" stay true claims. They need the package registry (pip).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _lower_bound(name: str) -> str:
    """The `>=` bound of `name` in setup.py's requirement constants (e.g. TRANSFORMERS)."""
    text = (REPO / "setup.py").read_text()
    m = re.search(rf'"{name}>=([0-9.]+),<([0-9.]+)"', text)
    assert m, f"setup.py has no '{name}>=X,<Y' requirement"
    return m.group(1)


def _throwaway_venv(where: Path) -> Path:
    """A venv whose own site-packages come first, then this interpreter's (through a .pth that
    runs site.addsitedir, so the editable gptfast's finder is processed too). Returns its python."""
    venv.EnvBuilder(with_pip=False).create(where)
    py = where / "bin" / "python"
    own = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    lines = [f"import site; site.addsitedir({p!r})" for p in parents]
    Path(own, "zz_parent_site.pth").write_text("\n".join(lines) + "\n")
    return py


def _pip_install(py: Path, *reqs: str) -> None:
    target = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", target, *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"


def _version(py: Path, module: str) -> str:
    r = subprocess.run([py, "-c", f"import {module}; print({module}.__version__)"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _pytest(py: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTFAST_STRICT_SKIPS": "1"}  # a skip there is a failure, as in CI
    return subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=REPO, env=env)


def test_hf_patch_on_oldest_transformers(tmp_path):
    oldest = _lower_bound("transformers")
    py = _throwaway_venv(tmp_path / "venv")
    _pip_install(py, f"transformers=={oldest}.*")
    assert _version(py, "transformers").startswith(oldest + ".")
    r = _pytest(py, "tests/test_hf_patch.py")
    assert r.returncode == 0, f"tests/test_hf_patch.py on transformers {oldest}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_triton_interpreter_on_oldest_triton(tmp_path):
    oldest = _lower_bound("triton")
    py = _throwaway_venv(tmp_path / "venv")
    # triton 3.6's interpreter breaks with numpy >= 2.3 (int() of a 1-element array): the pin
    # README and setup.py document for that end of the range.
    _pip_install(py, f"triton=={oldest}.*", "numpy<2.3")
    assert _version(py, "triton").startswith(oldest + ".")
    r = _pytest(py, "tests/test_triton_kernels.py")
    assert r.returncode == 0, f"tests/test_triton_kernels.py on triton {oldest}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout, r.stdout[-2000:]
