"""CI's rule for skips (DOLA_CPP_NO_SKIP=1): every test must really run.

A skip anywhere is a failure: in a test's setup, call or teardown, and at collection (a module
that skips itself, e.g. with ``pytest.importorskip``, would otherwise vanish from the run with its
tests uncounted). The one exemption is a test marked ``hardware("FEATURE")`` that skips on a
machine without FEATURE; where this machine is expected to have FEATURE (``expected_hardware``)
the skip is a failure too. A last check at the end of the session counts the skips that were let
through: any without an exemption fails the session, wherever it came from.

The hooks are imported into ``conftest.py``; ``tests/test_skip_policy.py`` runs them in inner
pytest sessions.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import pytest

EXEMPT = "dola_cpp_hardware_exemption"  # the attribute a let-through skip's report carries


def no_skip() -> bool:
    return os.environ.get("DOLA_CPP_NO_SKIP") == "1"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


GPU_BACKENDS = ("CUDA", "Metal", "MTL", "Vulkan", "HIP", "ROCm", "SYCL", "MUSA", "OpenCL")


def gpu_backends() -> list[str]:
    """The GPU backends this build registered (llama.cpp's system info lists each backend with its
    features; RPC, which also counts as offloading, is not a device here)."""
    from dola_cpp import _core

    info = _core.system_info()
    return [b for b in GPU_BACKENDS if f"{b} :" in info]


@functools.lru_cache(maxsize=None)
def expected_hardware() -> dict[str, str]:
    """The features a ``hardware`` test may name that this machine is expected to have, each with
    the reason: a test that skips for lack of one of them fails in CI."""
    from dola_cpp import _core

    out: dict[str, str] = {}
    flags = cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64"):
        out["x86"] = "this is an x86-64 machine"
        if "avx2" in flags:
            # ggml's CPU backend repacks Q4_0 for AVX2 (CPU_REPACK) and dola-cpp's own projection
            # kernels need AVX2: a build without them on this CPU has lost them
            out["CPU_REPACK"] = "x86 with AVX2: ggml's CPU_REPACK buffer type takes Q4_0 there"
            out["KERNELS"] = "x86 with AVX2: dola-cpp's projection kernels run there"
        if "amx_int8" in flags and _core.amx_build_note().startswith("enabled"):
            out["AMX"] = f"the CPU has amx_int8 and the build enabled AMX ({_core.amx_build_note()})"
    if gpu_backends():
        out["GPU"] = f"this build has a GPU backend ({', '.join(gpu_backends())})"
    if sys.platform.startswith("linux"):
        out["linux"] = "this is Linux"
    return out


def hardware_features(item) -> list[str]:
    """The features named by the item's ``hardware`` markers (its own and its parameters')."""
    names: list[str] = []
    for mark in item.iter_markers("hardware"):
        names += [str(a) for a in mark.args]
    return names


def _refusal(item) -> Optional[str]:
    """Why a skip of ``item`` is not allowed in CI, or None where it is a hardware exemption."""
    features = hardware_features(item)
    if not features:
        if item.get_closest_marker("hardware") is not None:
            return "a hardware marker must name the feature the test needs, e.g. hardware('CPU_REPACK')"
        return "skipped in CI (DOLA_CPP_NO_SKIP=1)"
    expected = expected_hardware()
    present = [f for f in features if f in expected]
    if present:
        return (f"skipped in CI although this machine is expected to have {present[0]} "
                f"({expected[present[0]]})")
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _refusal(item)
    if reason is None:
        setattr(report, EXEMPT, ", ".join(hardware_features(item)))
    elif no_skip():
        report.outcome = "failed"
        report.longrepr = f"{reason}: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module (or class) that skips while being collected takes all its tests with it."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and no_skip():
        report.outcome = "failed"
        report.longrepr = (f"skipped at collection in CI (DOLA_CPP_NO_SKIP=1), with all its tests: "
                           f"{_skip_reason(report)}")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.section(f"skipped tests and why ({len(skipped)})")
    for report in skipped:
        exempt = getattr(report, EXEMPT, None)
        label = f"hardware exemption [{exempt}]" if exempt else "NOT EXEMPT"
        terminalreporter.write_line(f"{report.nodeid}: {label}: {_skip_reason(report)}")
    if not skipped:
        terminalreporter.write_line("none")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """The session's skip count: under DOLA_CPP_NO_SKIP=1 only hardware exemptions may remain."""
    if not no_skip():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    stray = [r for r in reporter.stats.get("skipped", []) if not getattr(r, EXEMPT, None)]
    if stray:
        reporter.write_line(f"DOLA_CPP_NO_SKIP=1: {len(stray)} skip(s) without a hardware exemption: "
                            + ", ".join(r.nodeid for r in stray), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
