"""The suite's fixtures and its environment.

The suite runs in an environment of its own: none of the caller's ``DOLA_CPP_*`` settings (they
change what the session-wide models compute: ``DOLA_CPP_CAPTURE``, ``DOLA_CPP_KERNEL``,
``DOLA_CPP_DEVICE_CONTRAST``, ...; ``DOLA_CPP_NO_SKIP``, the suite's own switch, stays), and a
session cache (``DOLA_CPP_CACHE``) in a temporary folder whose ``models/`` links to the demo models:
they are located (and downloaded once, when missing) in the caller's cache before the suite starts,
and nothing else of that cache is read or written. No test looks a name up in DNS: the resolver
answers only for loopback names and addresses, as it would on a machine without network.
"""

import functools
import http.server
import ipaddress
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

import dola_cpp
from dola_cpp import evaldata, hub
from skip_policy import (pytest_make_collect_report, pytest_runtest_makereport,  # noqa: F401 (hooks)
                         pytest_sessionfinish, pytest_terminal_summary)

# the rows of the evaluation data the tests use, with their licences (tests/data/README.md)
DATA = Path(__file__).resolve().parent / "data"
TFQA_CSV = DATA / "truthfulqa" / "TruthfulQA_sample.csv"
FACTOR_CSV = DATA / "factor" / "expert_factor_sample.csv"

pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs inner sessions

_session: dict = {}


def _no_dns(real):
    """``socket.getaddrinfo`` for loopback only: any other name fails as unresolvable."""

    @functools.wraps(real)
    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name in ("", "localhost", "localhost.localdomain"):
            return real(host, *args, **kwargs)
        try:
            ipaddress.ip_address(name.strip("[]").split("%")[0])
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"the test suite looks up no names in DNS ({name!r})") from None
        return real(host, *args, **kwargs)

    return getaddrinfo


def pytest_configure(config):
    # the demo models, from the caller's cache (with the caller's DOLA_CPP_CACHE, if set)
    models = {name: hub.demo_model_path(name) for name in hub.DEMO_MODELS}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DOLA_CPP_") and k != "DOLA_CPP_NO_SKIP"}
    cache = Path(tempfile.mkdtemp(prefix="dola-cpp-test-cache-"))
    (cache / "models").mkdir()
    for path in models.values():
        try:
            (cache / "models" / path.name).symlink_to(path.resolve())
        except OSError:  # no symlinks here: a copy
            shutil.copy(path, cache / "models" / path.name)
    os.environ["DOLA_CPP_CACHE"] = str(cache)
    _session.update(saved=saved, cache=cache, getaddrinfo=socket.getaddrinfo)
    socket.getaddrinfo = _no_dns(socket.getaddrinfo)


def pytest_unconfigure(config):
    if not _session:
        return
    socket.getaddrinfo = _session["getaddrinfo"]
    shutil.rmtree(_session["cache"], ignore_errors=True)
    os.environ.pop("DOLA_CPP_CACHE", None)
    os.environ.update(_session["saved"])
    _session.clear()


@pytest.fixture(scope="session")
def session_cache() -> Path:
    """The suite's DOLA_CPP_CACHE."""
    return _session["cache"]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return dola_cpp.demo_model_path("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> dola_cpp.Model:
    return dola_cpp.Model(smollm2_path, n_ctx=1024)


@pytest.fixture(scope="session")
def f32_path(smollm2_path, tmp_path_factory) -> Path:
    """An F32 copy of SmolLM2 so quantized matmuls don't blur reference comparisons."""
    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    dola_cpp.convert_model(smollm2_path, out, "F32")
    return out


@pytest.fixture(scope="session")
def f32_model(f32_path) -> dola_cpp.Model:
    # exact mode: F32 KV cache, no flash attention
    return dola_cpp.Model(f32_path, n_ctx=512, kv_type="f32")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return dola_cpp.demo_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def hf_model(f32_path):
    import torch  # the test extra's: a plain import, so that a missing package fails the suite
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(f32_path.parent), gguf_file=f32_path.name, torch_dtype=torch.float32
    )
    model.eval()
    return model


def csv_records(path: Path) -> tuple[str, list[str]]:
    """A CSV file's header line and its records, each as its raw text (fields may span lines)."""
    import csv

    raw: list[str] = []
    records: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        def lines():
            for line in f:
                raw.append(line)
                yield line
        reader = csv.reader(lines())
        for _ in reader:
            records.append("".join(raw))
            raw.clear()
    return records[0], records[1:]


def csv_of_length(path: Path, n: int) -> str:
    """``path``'s header and ``n`` data records: its records over and over (a stand-in for a
    published file of that length)."""
    header, records = csv_records(path)
    return header + "".join(records[i % len(records)] for i in range(n))


class DataMirror:
    """A local web server laid out as raw.githubusercontent.com with the repository's evaluation
    rows (tests/data), plus a private cache whose ``models`` has the demo models: ``env`` makes a
    process download from here.

    TruthfulQA.csv, which has no pinned digest, is a stand-in of the published file's length (817
    rows, the sample's 20 over and over), so the row count that ``evaldata`` checks is the real
    one. expert_factor.csv is the 20-row sample; its pinned digest is replaced by the sample's for
    this process (``evaldata.DATASETS``), so a download from here is checked as the published
    file would be. A child process does not see that replacement: ``prefetch`` downloads a set
    here first, and the child finds it in the cache. The FACTOR licence files are the published
    ones, checked against their real pinned digests."""

    def __init__(self, root: Path, cache: Path, url: str):
        self.root, self.cache, self.url = root, cache, url
        self.env = {"DOLA_CPP_DATA_URL": url, "DOLA_CPP_CACHE": str(cache)}

    def file(self, name: str) -> Path:
        return self.root / evaldata.DATASETS[name].data.path

    def prefetch(self, name: str) -> Path:
        return evaldata.fetch(name)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def data_mirror(tmp_path, smollm2_path, gemma_path, monkeypatch):
    import dataclasses
    import hashlib

    root = tmp_path / "mirror"

    def put(item: evaldata.Published, content: bytes) -> Path:
        dest = root / item.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)
        return dest

    tfqa = evaldata.DATASETS["truthfulqa"]
    put(tfqa.data, csv_of_length(TFQA_CSV, tfqa.rows).encode())
    (licence,) = tfqa.licences
    put(licence, (DATA / "truthfulqa" / "LICENSE").read_bytes())
    expert = evaldata.DATASETS["factor-expert"]
    sample = FACTOR_CSV.read_bytes()
    put(expert.data, sample)
    for item in expert.licences:
        put(item, (DATA / "factor" / item.filename).read_bytes())
    monkeypatch.setitem(evaldata.DATASETS, "factor-expert", dataclasses.replace(
        expert, data=dataclasses.replace(expert.data, sha256=hashlib.sha256(sample).hexdigest())))
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for path in (smollm2_path, gemma_path):
        (cache / "models" / path.name).symlink_to(path.resolve())
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = DataMirror(root, cache, f"http://127.0.0.1:{server.server_address[1]}")
    for k, v in mirror.env.items():
        monkeypatch.setenv(k, v)
    for var in ("DOLA_CPP_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
                "HTTPS_PROXY", "ALL_PROXY"):  # the mirror is on this machine
        monkeypatch.delenv(var, raising=False)
    assert hub.cache_dir() == cache
    yield mirror
    server.shutdown()
    server.server_close()
