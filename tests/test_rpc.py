"""Layers on other machines through ggml's RPC backend: two `dola-cpp rpc-server`s on loopback."""

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import dola_cpp
from dola_cpp import _core

pytestmark = pytest.mark.skipif(not _core.rpc_available(), reason="built without GGML_RPC")

QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RpcServer:
    """`dola-cpp rpc-server` in a subprocess, outside the checkout (its dola_cpp/ would shadow the
    installed package)."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.log = tmp_path / f"rpc-{self.port}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dola_cpp.cli", "rpc-server", "--port", str(self.port), "--threads", "1"],
                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DOLA_CPP_DEBUG": ""})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "the rpc-server did not start"
                time.sleep(0.1)
        self.endpoint = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def servers(tmp_path):
    started = [RpcServer(tmp_path), RpcServer(tmp_path)]
    yield started
    for s in started:
        s.kill()


def test_dola_with_layers_on_two_rpc_servers_equals_local(servers, smollm2_path):
    remote = dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1, rpc=",".join(s.endpoint for s in servers))
    local = dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1, repack=False)  # the servers' plain layout
    assert remote.uses_rpc and not local.uses_rpc
    # the early-exit projection runs where the output matrix is: on an RPC server
    prompt = remote.apply_chat_template([{"role": "user", "content": QUESTION}])
    for kw in ({"layers": "high"}, {"layers": "high", "premature_norm": True}, {"layers": None}):
        r = remote.generate(prompt, max_tokens=16, **kw)
        assert r.tokens == local.generate(prompt, max_tokens=16, **kw).tokens, kw
    assert "RPC" in remote.projection_backend
    assert remote.projection_backend.endswith("(DoLa's contrast there too)")  # only K JSD values and 2 rows come back
    # teacher-forced scores agree too (the KV cache is on the servers)
    a = remote.score("Q: Who wrote Hamlet?\nA:", " Shakespeare.", layers="high")
    b = local.score("Q: Who wrote Hamlet?\nA:", " Shakespeare.", layers="high")
    assert a.premature_layers == b.premature_layers
    # the servers' CPU backend runs the same kernels on the same (plain) layout with the same thread
    # count, so the rows are the same (equal to the last bit on an AVX2 EPYC); what may differ is
    # the device contrast's float32 sums (~1e-6 relative of scores up to ~|640|)
    assert a.score == pytest.approx(b.score, rel=2e-6, abs=1e-4)
    np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=2e-6, atol=1e-4)


FREE_AFTER_SERVERS_DIE = """
import gc, sys, time
import dola_cpp
m = dola_cpp.Model(sys.argv[1], n_ctx=256, n_threads=1, rpc=sys.argv[2])
m.generate("Hello", max_tokens=4, layers="high")
print("generated", flush=True)
sys.stdin.readline()  # the servers are gone now
t0 = time.monotonic()
del m
gc.collect()
print(f"freed in {time.monotonic() - t0:.1f} s", flush=True)
"""


def test_a_model_whose_servers_died_while_idle_can_be_freed(servers, smollm2_path, tmp_path):
    """Servers that die between calls are noticed when the model is freed (its context and
    weights free their remote buffers through the guarded call): the process goes on, where the
    freeing thread used to park for good in ggml's abort. In a subprocess, so that a hang is a
    failure here and not the suite's."""
    script = tmp_path / "free.py"
    script.write_text(FREE_AFTER_SERVERS_DIE)
    child = subprocess.Popen([sys.executable, str(script), str(smollm2_path), ",".join(s.endpoint for s in servers)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == "generated", child.stderr.read()
        for s in servers:
            s.kill()
        out, err = child.communicate("go\n", timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0 and out.startswith("freed in"), (out, err)


def test_a_server_that_dies_mid_generation_is_a_clear_error(servers, smollm2_path):
    m = dola_cpp.Model(smollm2_path, n_ctx=512, n_threads=1, rpc=[s.endpoint for s in servers])
    outcome = {}
    generating = threading.Event()

    def generate():
        try:
            stream = m.stream("Count from 1 to 500:", max_tokens=450, ignore_eos=True, layers="high")
            for i, _ in enumerate(stream):
                if i == 2:  # tokens are coming from both servers now
                    generating.set()
            outcome["result"] = stream.result()
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e
        finally:
            generating.set()

    worker = threading.Thread(target=generate)
    worker.start()
    assert generating.wait(timeout=300)
    servers[1].kill()
    worker.join(timeout=120)  # a hang guard: the error comes at the next token
    assert not worker.is_alive(), "the generation hung after its RPC server died"
    err = outcome.get("error")
    assert isinstance(err, dola_cpp.DolaError), outcome
    assert "RPC server stopped answering" in str(err) and "load the model again" in str(err)
    with pytest.raises(dola_cpp.DolaError, match="RPC server stopped answering"):
        m.generate("Hi", max_tokens=2)
    # this process is fine: local models and new RPC models work
    assert "Paris" in dola_cpp.Model(smollm2_path, n_ctx=256, n_threads=1).generate(
        "The capital of France is", max_tokens=4).text
    again = dola_cpp.Model(smollm2_path, n_ctx=256, n_threads=1, rpc=servers[0].endpoint)
    assert "Paris" in again.generate("The capital of France is", max_tokens=4).text


def test_bad_rpc_endpoints(smollm2_path):
    for bad in ("localhost", "host:", ":50052", "host:port", "host:70000", ""):
        with pytest.raises(ValueError, match="host:port|at least one"):
            dola_cpp.Model(smollm2_path, rpc=bad)
    with pytest.raises(dola_cpp.DolaError, match=r"cannot use the RPC server at 127\.0\.0\.1:\d+ .*Failed to connect"):
        dola_cpp.Model(smollm2_path, rpc=f"127.0.0.1:{free_port()}")


def test_cli_generate_with_rpc(servers, smollm2_path, tmp_path):
    args = [sys.executable, "-m", "dola_cpp.cli", "generate", str(smollm2_path), QUESTION, "-n", "12", "--threads", "1"]
    remote = subprocess.run(args + ["--rpc", servers[0].endpoint], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    local = subprocess.run(args + ["--no-repack"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "Paris" in remote.stdout


CTRL_C = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import dola_cpp
m = dola_cpp.Model(sys.argv[1], n_ctx=1024, n_threads=1, rpc=sys.argv[2])
print("ready", flush=True)
n = 0
try:
    for piece in m.stream("Count from 1 to 1000:", max_tokens=900, ignore_eos=True, layers="high"):
        n += 1
        if n == 3:
            print("generating", flush=True)  # the test sends SIGINT now
    print("finished")
except KeyboardInterrupt:
    print("interrupted after %d pieces" % n)
print("usable:", m.generate("The capital of France is", max_tokens=4).text)
"""


def test_ctrl_c_stops_a_generation_on_rpc_servers(servers, smollm2_path, tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(smollm2_path), servers[0].endpoint], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "generating"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)  # a hang guard
    assert proc.returncode == 0, out
    assert "interrupted after" in out and "Paris" in out.split("usable:")[1], out
    # stopped long before the budget of 900 tokens
    assert int(out.split("interrupted after ")[1].split()[0]) < 900, out
