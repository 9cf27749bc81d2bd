"""No leaks in the core under repeated model/context creation, checked with
LeakSanitizer preloaded into a child interpreter (LSan needs no instrumented build)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import gc, sys
import dola_cpp
path, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    m = dola_cpp.Model(path, n_ctx=64)
    m.generate("the capital", max_tokens=4, layers="high")
    m.score("the", " a b", layers="low", relative_top=0.1, post_softmax=True)
    shared = m.share()
    shared.generate("the", max_tokens=2, layers=[0, 2])
    stream = m.stream("the a", max_tokens=10)
    next(stream)
    stream.close()
    for bad in ("/nonexistent.gguf", __file__):
        try:
            dola_cpp.Model(bad)
        except (FileNotFoundError, dola_cpp.DolaError):
            pass
    try:
        m.generate("the", max_tokens=2, layers=[99])
    except ValueError:
        pass
    # grammars, JSON schemas and log-probs, and the ones llama.cpp cannot use
    m.generate("the", max_tokens=4, grammar="root ::= [a-z ]+", top_logprobs=3)
    m.generate("the", max_tokens=4, json_schema={"type": "object"}, temperature=0.8, layers="high")
    m.score("the", " a b", top_logprobs=2)
    for bad in ({"grammar": "root ::= undefined"}, {"json_schema": {"$ref": "https://example.com/x"}}):
        try:
            m.generate("the", max_tokens=2, **bad)
        except ValueError:
            pass
    # the batch engine: a mix of decoders, one stream left mid-way, a refused request
    batch = m.batch(parallel=2)
    batch.generate(["the a", "a the", "the"], 3, configs=[dola_cpp.DecodeConfig().replace(layers="high"),
                                                          dola_cpp.DecodeConfig().replace(decoder="activation"),
                                                          dola_cpp.DecodeConfig().replace(grammar="root ::= [a-z ]+")])
    left = batch.stream("the a", max_tokens=10)
    next(left)
    left.close()
    try:
        batch.stream("the", max_tokens=2, grammar="root ::= undefined")
    except ValueError:
        pass
    del m, shared, stream, batch, left
    gc.collect()

# the positive control: blocks nothing points to, which LeakSanitizer must report at exit. malloc's
# result is dropped by ctypes (restype None: the address is only ever in a register), on a thread
# that then ends; LSan scans conservatively, so of several blocks at least one must be reported
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = None
t = threading.Thread(target=lambda: [libc.malloc(ctypes.c_size_t(DELIBERATE)) for _ in range(DELIBERATE_BLOCKS)])
t.start()
t.join()
"""

DELIBERATE = 123457  # bytes, an odd size nothing else allocates
DELIBERATE_BLOCKS = 8


def lsan_library() -> str | None:
    try:
        out = subprocess.run(["gcc", "-print-file-name=liblsan.so"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return None
    return out if Path(out).is_absolute() and Path(out).exists() else None


def leak_report(lib: str, model: Path, tmp_path: Path, n: int) -> tuple[int, str]:
    script = tmp_path / "leak_script.py"
    script.write_text(SCRIPT.replace("DELIBERATE_BLOCKS", str(DELIBERATE_BLOCKS)).replace("DELIBERATE", str(DELIBERATE)))
    p = subprocess.run(
        [sys.executable, str(script), str(model), str(n)],
        env=dict(os.environ, LD_PRELOAD=lib, PYTHONMALLOC="malloc", LSAN_OPTIONS="exitcode=0:fast_unwind_on_malloc=0"),
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # LeakSanitizer ran: it reports the deliberate leak (so "no leak of ours" below means something)
    m = re.search(r"SUMMARY: LeakSanitizer: (\d+) byte", p.stderr)
    assert m, f"LeakSanitizer printed no report: it did not run\n{p.stderr[-3000:]}"
    deliberate = [(int(b), int(k)) for b, k in re.findall(r"Direct leak of (\d+) byte\(s\) in (\d+) object", p.stderr)
                  if int(b) == int(k) * DELIBERATE]
    assert deliberate and sum(k for _, k in deliberate) <= DELIBERATE_BLOCKS, p.stderr[-3000:]
    # the rest: what the interpreter and the code under test left
    return int(m.group(1)) - sum(b for b, _ in deliberate), p.stderr


# A leak is ours when a stack frame is in our code, llama.cpp or ggml: matched on the function (or,
# unsymbolised, the extension's file name), never on a path, which may itself contain "dola-cpp"
# or "llama" (a clone in ~/src/dola-cpp/.venv/... would otherwise claim numpy's allocations).
OUR_FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (?:dola::|llama_|llm_|ggml_|gguf_|_core::)|\(\S*/_core\.[^/\s]*\.so\+0x")


def our_leaks(report: str) -> list[str]:
    return [block for block in report.split("\n\n") if OUR_FRAME.search(block)]


def test_leak_filter_matches_frames_not_paths():
    numpy_in_a_clone = (
        "Direct leak of 64 byte(s) in 1 object(s) allocated from:\n"
        "    #0 0x7f00 in malloc (/usr/lib/x86_64-linux-gnu/liblsan.so.0+0xf3)\n"
        "    #1 0x7f01 in PyDataMem_UserNEW /home/u/src/dola-cpp/.venv/lib/python3.11/site-packages/numpy/core/"
        "multiarray.so+0x1f (/home/u/src/llama-dola/dola-cpp/.venv/numpy/_multiarray_umath.so+0x1f)")
    ours = (
        "Direct leak of 32 byte(s) in 1 object(s) allocated from:\n"
        "    #0 0x7f00 in operator new(unsigned long) (/usr/lib/x86_64-linux-gnu/liblsan.so.0+0xf3)\n"
        "    #1 0x7f02 in llama_model_load_from_file /home/u/dola-cpp/third_party/llama.cpp/src/llama.cpp:99")
    unsymbolised = "    #1 0x7f03  (/home/u/dola-cpp/.venv/lib/python3.11/site-packages/dola_cpp/_core.cpython-311-x86_64-linux-gnu.so+0x1234)"
    assert our_leaks(numpy_in_a_clone) == []
    assert our_leaks(ours) == [ours]
    assert our_leaks(unsymbolised) == [unsymbolised]
    # the deliberate leak of the leak script (allocated through ctypes) is not ours
    deliberate = (f"Direct leak of {DELIBERATE} byte(s) in 1 object(s) allocated from:\n"
                  "    #0 0x7f00 in malloc (/usr/lib/x86_64-linux-gnu/liblsan.so.0+0xf3)\n"
                  "    #1 0x7f04 in ffi_call_unix64 (/lib/x86_64-linux-gnu/libffi.so.8+0x7052)")
    assert our_leaks(deliberate) == []


def test_repeated_model_and_context_creation_leaks_nothing(tmp_path):
    lib = lsan_library()
    if lib is None:
        pytest.skip("liblsan not found (gcc's sanitizer runtime)")
    from dola_cpp.synthetic import write_llama_gguf

    model = write_llama_gguf(tmp_path / "tiny.gguf")
    once, _ = leak_report(lib, model, tmp_path, 1)
    many, report = leak_report(lib, model, tmp_path, 6)
    # the interpreter leaves a fixed set of objects at exit; anything of ours grows with n
    ours = our_leaks(report)
    assert not ours, "\n\n".join(ours)[:4000]
    assert many == once, report[-4000:]
