"""CI's skip rule (tests/conftest.py): with CI=true a skip for any reason but "no CUDA device" fails."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

DEMO = '''
import pytest

def test_missing_package():
    pytest.skip("package foo is not installed")

@pytest.mark.skipif(True, reason="no CUDA device")
def test_gpu_only():
    pass

@pytest.mark.gpu
def test_gpu_marked():
    pass

def test_passes():
    pass
'''


def _run(pytester, monkeypatch, ci: str | None):
    monkeypatch.delenv("GPTFAST_STRICT_SKIPS", raising=False)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(test_demo=DEMO, test_module_skip="import pytest\npytest.importorskip('no_such_pkg_zz')\n"
                        "def test_never(): pass\n")
    return pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors")


def test_ci_turns_non_gpu_skips_into_failures(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "true")
    out = result.stdout.str()
    # the GPU skips stay skips; the missing package fails, as a test and as a whole module
    assert "FAILED test_demo.py::test_missing_package" in out, out
    assert "ERROR test_module_skip.py" in out, out
    assert "no CUDA device" in out and "needs a CUDA device" in out, out
    result.assert_outcomes(passed=1, failed=1, skipped=2, errors=1)


def test_outside_ci_skips_stay_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=4)
