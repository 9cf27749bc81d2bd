"""The evaluation datasets' published files, downloaded once into the user cache with their licences.

Both come from their authors' GitHub repositories at pinned commits: TruthfulQA's original
817-question file, which the DoLa paper evaluated (the DoLa repository's ``tfqa_mc_eval.py``
downloads the branch ``main``, which a 2025 revision changed to 790 questions), and FACTOR's files,
checked against pinned SHA-256 digests. Where no digest is pinned, the row count is checked and the
digest recorded. Offline (``DOLA_CPP_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, or the host unreachable
within a few seconds) a cached file is used and a missing one is an immediate error that says how
to give the file instead.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .hub import cache_dir, reachable, sha256_of

GITHUB_RAW = "https://raw.githubusercontent.com"
PROBE_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 30.0
_FACTOR_COMMIT = "ee9de30abf28e94b163167dc41ad51fbbdb48c32"
_TFQA_COMMIT = "fdd8ad1c0d00a478cf8b0bb41a3ad8378c16293b"


@dataclass(frozen=True)
class Published:
    """One file at ``{GITHUB_RAW}/{path}``; ``sha256`` is None where no digest is pinned."""

    path: str
    sha256: Optional[str] = None

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Dataset:
    name: str
    data: Published
    licences: tuple[Published, ...]
    about: str
    rows: int  # data rows of the published CSV


_FACTOR_LICENCES = (
    Published(f"AI21Labs/factor/{_FACTOR_COMMIT}/LICENSE",
              "95ca549d06fe3f3d6dfe1b266d0e75a44cb0de8f34b893ab11399d53abb1f4bb"),
    Published(f"AI21Labs/factor/{_FACTOR_COMMIT}/FACTOR_NEWS_LICENSE.md",
              "11a6d83734845ad09d809667aa219857a5b985b28c258a2eebf5677668a6bd3b"),
)

DATASETS: dict[str, Dataset] = {
    "truthfulqa": Dataset(
        "truthfulqa",
        Published(f"sylinrl/TruthfulQA/{_TFQA_COMMIT}/TruthfulQA.csv"),
        (Published(f"sylinrl/TruthfulQA/{_TFQA_COMMIT}/LICENSE"),),
        "TruthfulQA (Lin et al., 2021), 817 questions; Apache-2.0",
        817,
    ),
    "factor-news": Dataset(
        "factor-news",
        Published(f"AI21Labs/factor/{_FACTOR_COMMIT}/data/news_factor.csv",
                  "f4f3110a66bfca3a1decb88f14ce55b4e9656be80894bcd94216cc2c61be8260"),
        _FACTOR_LICENCES,
        "NEWS-FACTOR (Muhlgay et al., 2023), 1036 examples; ODC-By 1.0 (FACTOR_NEWS_LICENSE.md) "
        "and the CommonCrawl terms of use",
        1036,
    ),
    "factor-expert": Dataset(
        "factor-expert",
        Published(f"AI21Labs/factor/{_FACTOR_COMMIT}/data/expert_factor.csv",
                  "39cbceba9b43e713069a155e2028f6a2335b792983110b935a71ddb065766bde"),
        _FACTOR_LICENCES,
        "EXPERT-FACTOR (Muhlgay et al., 2023), 236 examples; MIT",
        236,
    ),
    "factor-wiki": Dataset(
        "factor-wiki",
        Published(f"AI21Labs/factor/{_FACTOR_COMMIT}/data/wiki_factor.csv"),
        _FACTOR_LICENCES,
        "WIKI-FACTOR (Muhlgay et al., 2023), 2994 examples; MIT",
        2994,
    ),
}


class DataUnavailable(OSError):
    """A dataset is neither cached nor downloadable now; the message says what to do instead."""


def base_url() -> str:
    """``$DOLA_CPP_DATA_URL`` (a mirror laid out as raw.githubusercontent.com) or GitHub's."""
    return (os.environ.get("DOLA_CPP_DATA_URL") or GITHUB_RAW).rstrip("/")


def url_of(item: Published) -> str:
    return f"{base_url()}/{item.path}"


def offline_reason() -> Optional[str]:
    """Why no download is to be attempted, or None."""
    for var in ("DOLA_CPP_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def _folder(ds: Dataset) -> Path:
    return cache_dir() / "data" / ds.name


def cached_path(name: str) -> Optional[Path]:
    """The dataset's cached file, or None."""
    ds = _lookup(name)
    path = _folder(ds) / ds.data.filename
    return path if path.exists() else None


def _lookup(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _csv_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _download(item: Published, dest: Path, rows: Optional[int] = None) -> str:
    """Fetch ``item`` to ``dest`` (atomically), check its pinned digest (or, without one, its row
    count), return its SHA-256."""
    url = url_of(item)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=dest.name, suffix=".partial", delete=False) as tmp:
        partial = Path(tmp.name)
        try:
            # a fresh opener reads the proxy settings now (urlopen's is built once per process)
            with urllib.request.build_opener().open(url, timeout=READ_TIMEOUT_SECONDS) as resp:
                while block := resp.read(1 << 20):
                    tmp.write(block)
        except OSError as e:  # urllib's URLError and HTTPError included
            tmp.close()
            partial.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e
            raise DataUnavailable(f"could not download {url}: {reason}") from None
    digest = sha256_of(partial)
    if item.sha256 is not None and digest != item.sha256:
        partial.unlink(missing_ok=True)
        raise DataUnavailable(f"{url}: sha256 {digest} does not match the pinned {item.sha256}; "
                              "the download was discarded")
    if item.sha256 is None and rows is not None and (n := _csv_rows(partial)) != rows:
        partial.unlink(missing_ok=True)
        raise DataUnavailable(f"{url} has {n} rows where the published file has {rows}; the download was discarded")
    os.replace(partial, dest)
    return digest


def fetch(name: str, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Path of dataset ``name``'s published file in the cache (``DATASETS``), downloading it and its
    licence files on first use. Raises DataUnavailable, at once, when it is not cached and cannot be
    downloaded now."""
    cached = cached_path(name)
    if cached is not None:
        return cached
    ds = DATASETS[name]
    first = url_of(ds.data)
    reason = offline_reason()
    if reason is None and not reachable(first, PROBE_SECONDS):
        reason = f"{urllib.parse.urlparse(first).netloc} cannot be reached (no network?)"
    if reason is not None:
        raise DataUnavailable(f"{ds.data.filename} ({ds.about}) is not in the cache and {reason}; "
                              f"connect and retry, or download {first} yourself and give it with --data")
    folder = _folder(ds)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"dataset": ds.name, "about": ds.about, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "files": {}}
    # licences first: the data file's presence is what marks the folder complete
    for item in ds.licences + (ds.data,):
        if progress:
            progress(f"downloading {url_of(item)}")
        rows = ds.rows if item is ds.data else None
        record["files"][item.filename] = {"url": url_of(item), "sha256": _download(item, folder / item.filename, rows)}
    (folder / "SOURCE.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder / ds.data.filename
