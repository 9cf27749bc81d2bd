import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

import dola_cpp
from dola_cpp import evaldata, hub

# the project's evaluation data, in the shared folder beside the checkout
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (DOLA_CPP_NO_SKIP=1) a skipped test is a failure: every test must really run. The one
    exception is a test marked ``hardware`` whose machine lacks the feature (no CI machine has AMX,
    KleidiAI and a GPU at once): it stays a visible skip that names what is missing."""
    outcome = yield
    report = outcome.get_result()
    hardware = item.get_closest_marker("hardware") is not None
    if (os.environ.get("DOLA_CPP_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail")
            and not hardware):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (DOLA_CPP_NO_SKIP=1): {report.longrepr}"


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
def hf_model(f32_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(f32_path.parent), gguf_file=f32_path.name, torch_dtype=torch.float32
    )
    model.eval()
    return model


class DataMirror:
    """A local web server laid out as raw.githubusercontent.com with the evaluation files the
    shared folder has, plus a private cache whose ``models`` is the real one: ``env`` makes a
    process download from here. TruthfulQA.csv is a stand-in with the published file's 817 rows:
    the dev half's 409, then its first 408 again."""

    def __init__(self, root: Path, cache: Path, url: str):
        self.root, self.cache, self.url = root, cache, url
        self.env = {"DOLA_CPP_DATA_URL": url, "DOLA_CPP_CACHE": str(cache)}

    def file(self, name: str) -> Path:
        return self.root / evaldata.DATASETS[name].data.path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def data_mirror(tmp_path, smollm2_path, monkeypatch):
    sources = {
        "truthfulqa": SHARED_DATA / "truthfulqa" / "TruthfulQA_dev.csv",
        "factor-news": SHARED_DATA / "factor" / "news_factor.csv",
        "factor-expert": SHARED_DATA / "factor" / "expert_factor.csv",
    }
    licences = {"LICENSE": None, "FACTOR_NEWS_LICENSE.md": SHARED_DATA / "factor" / "FACTOR_NEWS_LICENSE.md"}
    missing = [p for p in list(sources.values()) + [licences["FACTOR_NEWS_LICENSE.md"]] if not p.exists()]
    if missing:
        pytest.skip(f"evaluation data not beside this checkout: {missing[0]}")
    root = tmp_path / "mirror"
    for name, source in sources.items():
        ds = evaldata.DATASETS[name]
        for item in (ds.data,) + ds.licences:
            dest = root / item.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if item is ds.data and name == "truthfulqa":
                header, *rows = source.read_text().splitlines(keepends=True)
                dest.write_text("".join([header] + rows + rows[:817 - len(rows)]))
            elif item is ds.data:
                shutil.copy(source, dest)
            elif item.filename == "LICENSE" and name.startswith("factor"):
                shutil.copy(SHARED_DATA / "factor" / "LICENSE", dest)
            elif licences.get(item.filename):
                shutil.copy(licences[item.filename], dest)
            else:
                dest.write_text("Apache License 2.0 (a stand-in served by the test mirror)\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(smollm2_path.parent)
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
