"""The extension lives with other native libraries in one process: it exports only its module
init, so another ggml/llama.cpp (llama-cpp-python), a static libstdc++ or numpy's and torch's
libraries can neither interpose on its symbols nor be interposed on."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dola_cpp._core

CORE = Path(dola_cpp._core.__file__)


def _run(code: str, *, cwd: Path) -> subprocess.CompletedProcess:
    # -I: the source checkout must not shadow the installed package
    return subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_core_exports_only_its_module_init():
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to list the extension's dynamic symbols"
    out = subprocess.run([nm, "-D", "--defined-only", str(CORE)], capture_output=True, text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert names == ["PyInit__core"], names


def test_numpy_first_then_load_and_generate(smollm2_path, tmp_path):
    r = _run(f"""
        import numpy
        numpy.linalg.svd(numpy.ones((64, 64)))  # numpy's BLAS threads and allocator are live
        import dola_cpp
        m = dola_cpp.Model({str(smollm2_path)!r}, n_ctx=256)
        print(repr(m.generate("The capital of France is", max_tokens=4, layers="high").text))
    """, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("'")


def test_another_llama_cpp_in_the_process_is_not_called(smollm2_path, tmp_path):
    """A library loaded first with RTLD_GLOBAL (as ctypes-based bindings may be) that defines
    llama.cpp's and ggml's entry points must not capture dola-cpp's calls: these abort."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the impostor library"
    names = ["llama_backend_init", "llama_model_load_from_file", "llama_decode", "llama_init_from_model",
             "llama_tokenize", "ggml_backend_tensor_get", "ggml_init", "ggml_graph_compute", "gguf_init_from_file"]
    src = tmp_path / "impostor.c"
    src.write_text("#include <stdio.h>\n#include <stdlib.h>\n" + "".join(
        f'void {n}(void) {{ fputs("impostor {n} called\\n", stderr); abort(); }}\n' for n in names))
    lib = tmp_path / "libimpostor.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    r = _run(f"""
        import ctypes, os
        ctypes.CDLL({str(lib)!r}, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        import dola_cpp
        m = dola_cpp.Model({str(smollm2_path)!r}, n_ctx=256)
        print(repr(m.generate("The capital of France is", max_tokens=4, layers="high").text))
    """, cwd=tmp_path)
    assert r.returncode == 0 and "impostor" not in r.stderr, r.stderr[-2000:]
