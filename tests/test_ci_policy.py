"""Under CI=true a skipped test fails the run, unless it needs CUDA or a non-root user."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

_CONFTEST = (Path(__file__).parent / "conftest.py").read_text(encoding="utf-8")


def test_skips_fail_under_ci_except_cuda_and_root(pytester, monkeypatch):
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(
        test_sample="""
        import pytest

        def test_runs():
            pass

        def test_missing_extra():
            pytest.importorskip("no_such_package_for_camlens")

        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_gpu():
            pass

        @pytest.mark.skipif(True, reason="needs POSIX non-root")
        def test_permissions():
            pass
        """
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, skipped=2)
    monkeypatch.setenv("CI", "false")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3)
