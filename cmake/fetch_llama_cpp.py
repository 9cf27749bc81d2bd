"""Obtain the pinned llama.cpp source without network access beyond PyPI.

The source is `vendor/llama.cpp` inside the PyPI sdist of llama-cpp-python (the pinned commit is in the README). The sdist is
checked against its sha256, cached in the user cache, and its llama.cpp folder extracted to DEST.
Called by CMakeLists.txt at configure time when third_party/llama.cpp is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"


def cache_dir() -> Path:
    base = os.environ.get("DOLA_CPP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dola-cpp"
    )
    return Path(base) / "sdist"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(dest_dir: Path) -> Path:
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"{PACKAGE}=={VERSION}", "-d", str(dest_dir)]
    # Without build isolation pip reads the sdist's metadata with the scikit-build-core we are
    # already running under, instead of installing llama-cpp-python's build backend first.
    for extra in (["--no-build-isolation"], []):
        if subprocess.call(base + extra) == 0 and (dest_dir / SDIST).exists():
            return dest_dir / SDIST
    raise SystemExit(f"could not download {PACKAGE}=={VERSION} from PyPI; "
                     f"pass -DDOLA_LLAMA_CPP_DIR=/path/to/llama.cpp to use your own checkout")


def main() -> None:
    dest = Path(sys.argv[1]).resolve()
    cached = cache_dir() / SDIST
    if not (cached.exists() and sha256(cached) == SHA256):
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            got = download(Path(tmp))
            digest = sha256(got)
            if digest != SHA256:
                raise SystemExit(f"{SDIST}: sha256 {digest} != pinned {SHA256}; refusing to build")
            os.replace(got, cached)
    print(f"-- dola-cpp: extracting llama.cpp from {cached}", flush=True)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(cached) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(PREFIX) or member.name == PREFIX:
                continue
            if not (member.isfile() or member.isdir() or member.issym()):
                continue
            member.name = member.name[len(PREFIX):]
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                continue
            tar.extract(member, staging)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)


if __name__ == "__main__":
    main()
