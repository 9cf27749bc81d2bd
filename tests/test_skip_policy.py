"""The CI skip policy (tests/skip_policy.py) in inner pytest sessions: under DOLA_CPP_NO_SKIP=1 a
skip fails wherever it happens, collection included, except a hardware exemption for a feature
this machine is not expected to have."""

import pytest

import skip_policy

CONFTEST = "from skip_policy import *  # noqa: F401,F403 (the hooks)\n"
MARKERS = """
[pytest]
markers = hardware(feature): needs a feature
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(MARKERS)

    def run(source: str, ci: bool, expected: dict | None = None):
        monkeypatch.setattr(skip_policy, "expected_hardware", lambda: expected or {})
        if ci:
            monkeypatch.setenv("DOLA_CPP_NO_SKIP", "1")
        else:
            monkeypatch.delenv("DOLA_CPP_NO_SKIP", raising=False)
        pytester.makepyfile(test_inner=source, test_other="def test_other():\n    pass\n")
        return pytester.runpytest("-p", "no:cacheprovider", "-rA")

    return run


def outcomes(result) -> dict:
    """The inner session's counts, a failure in setup (an error) counted as failed."""
    counts = result.parseoutcomes()
    counts["failed"] = counts.get("failed", 0) + counts.pop("errors", 0) + counts.pop("error", 0)
    return {k: v for k, v in counts.items() if v and k in ("failed", "passed", "skipped", "xfailed")}


MISSING_PACKAGE = """
import pytest
openai = pytest.importorskip("a_package_that_is_not_installed")

def test_one():
    pass

def test_two():
    pass
"""


def test_a_module_that_skips_at_collection_fails_in_ci(inner):
    quiet = inner(MISSING_PACKAGE, ci=False)
    quiet.assert_outcomes(skipped=1, passed=1)
    assert quiet.ret == pytest.ExitCode.OK  # the module's two tests vanished, and the run is green
    ci = inner(MISSING_PACKAGE, ci=True)
    assert ci.ret != pytest.ExitCode.OK
    ci.assert_outcomes(errors=1)  # a collection error stops the session: nothing runs
    ci.stdout.fnmatch_lines(["*skipped at collection in CI*a_package_that_is_not_installed*"])


def test_a_skip_in_setup_call_or_fixture_fails_in_ci(inner):
    source = """
import pytest

@pytest.fixture
def needs_something():
    pytest.skip("not here")

def test_fixture(needs_something):
    pass

@pytest.mark.skipif(True, reason="a condition")
def test_mark():
    pass

def test_call():
    pytest.skip("inside")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""
    inner(source, ci=False).assert_outcomes(skipped=3, xfailed=1, passed=1)
    ci = inner(source, ci=True)
    assert outcomes(ci) == {"failed": 3, "xfailed": 1, "passed": 1}
    ci.stdout.fnmatch_lines(["*skipped in CI (DOLA_CPP_NO_SKIP=1)*not here*"])


HARDWARE = """
import pytest

@pytest.fixture(params=[pytest.param("CPU_REPACK", marks=pytest.mark.hardware("CPU_REPACK")),
                        pytest.param("AMX", marks=pytest.mark.hardware("AMX"))])
def buffer_type(request):
    pytest.skip(f"this build offers no {request.param} buffer type")

def test_layout(buffer_type):
    pass

@pytest.mark.hardware("KERNELS")
def test_kernel():
    pytest.skip("this build has no projection kernels")

@pytest.mark.hardware
def test_unnamed():
    pytest.skip("something is missing")
"""


def test_a_hardware_skip_fails_where_the_feature_is_expected(inner):
    # an x86 machine with AVX2: CPU_REPACK and the projection kernels expected, AMX not
    expected = {"CPU_REPACK": "x86 with AVX2", "KERNELS": "x86 with AVX2"}
    ci = inner(HARDWARE, ci=True, expected=expected)
    assert outcomes(ci) == {"failed": 3, "skipped": 1, "passed": 1}
    ci.stdout.fnmatch_lines([
        "*setup of test_layout?CPU_REPACK?*",
        "skipped in CI although this machine is expected to have CPU_REPACK (x86 with AVX2): this build offers no*",
        "*test_kernel*",
        "skipped in CI although this machine is expected to have KERNELS (x86 with AVX2): this build has no projection kernels*",
        "*test_unnamed*",
        "a hardware marker must name the feature*",
    ])
    ci.stdout.fnmatch_lines(["*test_layout?AMX?: hardware exemption ?AMX?: this build offers no AMX buffer type*"])
    assert ci.ret == pytest.ExitCode.TESTS_FAILED
    # a machine with none of them: the named features are visible skips, the unnamed one fails
    bare = inner(HARDWARE, ci=True, expected={})
    assert outcomes(bare) == {"failed": 1, "skipped": 3, "passed": 1}
    # outside CI nothing fails
    inner(HARDWARE, ci=False, expected=expected).assert_outcomes(skipped=4, passed=1)


def test_only_exempt_skips_pass_the_session(inner):
    ok = inner(HARDWARE.split("@pytest.mark.hardware\n")[0], ci=True, expected={})
    ok.assert_outcomes(skipped=3, passed=1)
    assert ok.ret == pytest.ExitCode.OK
    ok.stdout.fnmatch_lines(["*skipped tests and why (3)*"])


def test_this_machine_is_expected_to_have_what_it_has():
    """The policy's table for this machine: on x86 with AVX2, CPU_REPACK and the projection kernels."""
    expected = skip_policy.expected_hardware()
    flags = skip_policy.cpu_flags()
    import platform

    if platform.machine() == "x86_64":
        assert "x86" in expected
        assert ("avx2" in flags) == ("CPU_REPACK" in expected) == ("KERNELS" in expected)
