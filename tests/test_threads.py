"""Decoding keeps working on a busy machine: with another process keeping a core busy, the
context computes with fewer threads (ggml's threads wait for each other at every graph node, so a
thread that shares its core with the other process stalls them all), and with all of them again
once the machine is idle."""

import os
import subprocess
import sys
import time

import pytest

from dola_cpp import Model

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_for_a_while(m: Model, seconds: float = 1.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m.generate("The history of Rome", max_tokens=16, ignore_eos=True)


@pytest.fixture
def busy_core():
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield
    p.kill()
    p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load is read from /proc (Linux only)")
@pytest.mark.skipif(CORES < 2, reason="one core: there is no thread to give up")
def test_fewer_threads_while_another_process_is_busy(smollm2_path, busy_core):
    m = Model(smollm2_path, n_ctx=256, n_threads=CORES)
    _decode_for_a_while(m)
    assert m.threads_in_use < CORES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load is read from /proc (Linux only)")
def test_all_threads_on_an_idle_machine_and_when_fixed(smollm2_path):
    m = Model(smollm2_path, n_ctx=256, n_threads=CORES)
    _decode_for_a_while(m)
    assert m.threads_in_use == CORES
    fixed = Model(smollm2_path, n_ctx=256, n_threads=CORES, adaptive_threads=False)
    fixed.generate("The history of Rome", max_tokens=4)
    assert fixed.threads_in_use == CORES and not fixed.share()._session.adaptive_threads
