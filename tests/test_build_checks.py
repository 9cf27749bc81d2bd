"""The configure-time checks that keep a native build from crashing where it was built
(cmake/native_checks.cmake), run on a tiny CMake project with AMX forced on. The GCC 12 bug they
guard against (an empty AMX tile configuration) shows in the compiler's assembly, so this runs on
any x86 machine, AMX or not."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AMX_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON", "-DGGML_AVX512=ON",
             "-DGGML_AVX512_VNNI=ON"]

pytestmark = [pytest.mark.hardware("x86"),
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is x86 only")]


def _configure(tmp_path: Path, *defines: str) -> tuple[str, str]:
    """(DOLA_AMX_NOTE, the CMake cache) of a project that runs the checks."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed (pip install cmake)"
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(checks C CXX)\n"
        f'include("{(ROOT / "cmake" / "native_checks.cmake").as_posix()}")\n'
        'dola_check_native_build()\nfile(WRITE "${CMAKE_BINARY_DIR}/note.txt" "${DOLA_AMX_NOTE}")\n')
    build = tmp_path / "build"
    r = subprocess.run([cmake, "-S", str(src), "-B", str(build), *defines], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (build / "note.txt").read_text(), (build / "CMakeCache.txt").read_text()


def _gcc_major() -> int | None:
    """The major version of the default C++ compiler when it is GCC, else None."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return None
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "clang" in out.lower():
        return None
    m = re.search(r"\) (\d+)\.", out.splitlines()[0]) if out else None
    return int(m.group(1)) if m else None


def test_amx_is_dropped_where_the_compiler_loses_the_tile_configuration(tmp_path):
    note, cache = _configure(tmp_path, *AMX_FLAGS)
    gcc = _gcc_major()
    if gcc is not None and gcc < 13:
        assert note.startswith("disabled at build:") and "drops the tile configuration" in note, note
        assert "GGML_AMX_INT8:BOOL=OFF" in cache
    else:  # GCC 13+ and clang keep it: the build keeps AMX unless the run check fails on AMX hardware
        assert "drops the tile configuration" not in note, note


def test_amx_can_be_switched_off(tmp_path):
    note, cache = _configure(tmp_path, *AMX_FLAGS, "-DDOLA_AMX=OFF")
    assert note == "disabled at build: DOLA_AMX=OFF"
    assert "GGML_AMX_INT8:BOOL=OFF" in cache


def test_no_amx_flags_nothing_to_check(tmp_path):
    note, _ = _configure(tmp_path, "-DGGML_NATIVE=OFF")
    assert note == "not enabled by the build's CPU flags"
