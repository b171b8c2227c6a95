"""``recbole-mm prepare NAME --input RAW_DIR``: one command from raw Amazon files to a dataset
every model trains on.

Steps (each one the existing pipeline command):

1. ``--download``: fetch the Amazon Reviews 2023 files of the category into ``RAW_DIR``
   (``<base>/review_categories/<Cat>.jsonl.gz`` and ``<base>/meta_categories/meta_<Cat>.jsonl.gz``;
   ``--base-url`` changes ``<base>``).  A file is written as ``<file>.part`` and renamed when
   complete; an interrupted or dropped transfer resumes where it stopped (HTTP ``Range``); the
   size announced by the server and the gzip checksum (CRC32 and length of every member) are
   checked before the rename.  Files already there are kept.
2. ``preprocess`` (k-core, leave-one-out split, ``.text``/``.attr``) into ``OUTPUT/NAME``;
3. ``extract-text``: ``.feat1CLS`` with ``--text-encoder`` (default: all-MiniLM-L6-v2);
4. with ``--images DIR --clip PATH``: ``download-images`` into ``DIR`` and ``extract-image``
   with the local CLIP folder ``PATH`` (``.feat3CLS``).  Without images, MISSRec / PMMRec / ReoLM
   run text-only (docs/text-only.md).

``NAME`` may be a paper's short name (Arts, Instruments, Office, Pantry, Scientific, Games,
Beauty, ...; ``recbole_mm.categories.ALIASES``) or an Amazon category; the raw files may be
named after either.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
import urllib.error
import urllib.request
import zlib

from recbole_mm.categories import ALIASES, resolve
from recbole_mm.pipeline.common import PipelineError

BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw"
CHUNK = 1 << 16


def category_urls(category: str, base_url: str = BASE_URL) -> dict[str, str]:
    """File name -> URL of the Amazon Reviews 2023 reviews and metadata of ``category``."""
    base = base_url.rstrip("/")
    return {
        f"{category}.jsonl.gz": f"{base}/review_categories/{category}.jsonl.gz",
        f"meta_{category}.jsonl.gz": f"{base}/meta_categories/meta_{category}.jsonl.gz",
    }


def download(url: str, dest: str, retries: int = 5, timeout: float = 60, backoff: float = 1.0, log=print) -> str:
    """``url`` -> ``dest`` through ``dest.part``, resuming with HTTP ``Range`` after a dropped
    connection (and across runs); size and gzip checksum checked before the rename."""
    if os.path.isfile(dest):
        return dest
    part = dest + ".part"
    total = None
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        try:
            total = _fetch_range(url, part, have, timeout)
            break
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code not in (408, 429, 500, 502, 503, 504):
                raise PipelineError(f"{url}: HTTP {e.code} {e.reason}") from None
            if attempt == retries:
                raise PipelineError(f"{url}: download failed after {retries + 1} attempts ({e}); "
                                    f"run again to resume from {os.path.getsize(part) if os.path.isfile(part) else 0:,} bytes") from None
            log(f"{os.path.basename(dest)}: {e}; resuming ({attempt + 1}/{retries})")
            time.sleep(backoff * 2 ** attempt)
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise PipelineError(f"{url}: got {size:,} bytes, the server announced {total:,}; run again to resume")
    _check_gzip(part, url)
    os.replace(part, dest)
    log(f"{os.path.basename(dest)}: {size:,} bytes")
    return dest


def _fetch_range(url: str, part: str, have: int, timeout: float) -> int | None:
    """Append the bytes after ``have`` to ``part``; returns the full size the server announced."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part is complete
            return _total(e.headers) or have
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored the range: start again
            have = 0
        total = _total(resp.headers)
        if total is None and resp.headers.get("Content-Length"):
            total = have + int(resp.headers["Content-Length"])
        with open(part, "ab" if have else "wb") as f:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
    got = os.path.getsize(part)
    if total is not None and got < total:
        raise ConnectionError(f"connection closed at {got:,} of {total:,} bytes")
    return total


def _total(headers) -> int | None:
    cr = headers.get("Content-Range")  # "bytes 100-199/200"
    if cr and "/" in cr and not cr.endswith("/*"):
        return int(cr.rsplit("/", 1)[1])
    return None


def _check_gzip(path: str, url: str) -> None:
    """Read the whole file through gzip: every member's CRC32 and length are verified."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        os.unlink(path)
        raise PipelineError(f"{url}: the downloaded file fails its gzip checksum ({e}); removed, run again") from None


def find_category(input_dir: str, name: str, fmt: str) -> str:
    """The category stem whose raw files are in ``input_dir``: ``name`` itself, else its 2023
    or 2018 Amazon name."""
    from recbole_mm.pipeline.preprocess import FORMATS

    rf = FORMATS[fmt]
    cands = list(dict.fromkeys([name, *resolve(name)]))
    for cat in cands:
        if any(os.path.isfile(os.path.join(input_dir, rf.reviews.format(cat=cat) + e)) for e in rf.exts):
            return cat
    raise PipelineError(
        f"{input_dir}: no raw files for {name} (looked for {', '.join(rf.reviews.format(cat=c) + rf.exts[0] for c in cands)}); "
        f"add --download to fetch the Amazon Reviews 2023 files"
    )


def prepare(a: argparse.Namespace, log=print) -> str:
    from recbole_mm.pipeline.images import download_images, extract_image_features
    from recbole_mm.pipeline.preprocess import preprocess
    from recbole_mm.pipeline.text import extract_text_features

    if a.images and not a.clip:
        raise PipelineError("--images needs --clip PATH: a local CLIP model folder (e.g. clip-vit-base-patch32)")
    if a.clip and not os.path.isdir(a.clip):
        raise PipelineError(f"{a.clip}: CLIP model folder not found (--clip)")
    if a.download:
        if a.fmt != "amazon2023":
            raise PipelineError("--download fetches the Amazon Reviews 2023 files: use it with --format amazon2023")
        os.makedirs(a.input, exist_ok=True)
        for fname, url in category_urls(resolve(a.name)[0], a.base_url).items():
            download(url, os.path.join(a.input, fname), retries=a.retries, timeout=a.timeout, log=log)
    cat = find_category(a.input, a.name, a.fmt)
    t0 = time.perf_counter()
    preprocess(a.input, cat, a.output, fmt=a.fmt, name=a.name, kcore_k=a.kcore, max_len=a.max_len,
               overwrite=a.overwrite, log=log)
    folder = os.path.join(a.output, a.name)
    t1 = time.perf_counter()
    extract_text_features(folder, a.text_encoder, device=a.device, overwrite=True, log=log)
    t2 = time.perf_counter()
    log(f"times: preprocess {t1 - t0:.1f} s, text features {t2 - t1:.1f} s")
    if a.images:
        download_images(folder, a.images, log=log)
        extract_image_features(folder, a.images, a.clip, device=a.device, overwrite=True, log=log)
    log(f"ready: python run_finetune.py -m UniSRec -d {a.name}"
        + ("" if os.path.normpath(a.output) == os.path.normpath("dataset/downstream") else f" --data_path={a.output}"))
    return folder


def register(sub) -> None:
    p = sub.add_parser("prepare", description=__doc__,
                       epilog="paper names: " + ", ".join(f"{k}={v[0]}" for k, v in ALIASES.items()),
                       help="raw Amazon files (or --download) -> a ready dataset: preprocess + text (+ image) features")
    p.add_argument("name", metavar="NAME", help="dataset name: a paper's short name (Arts, Scientific, ...) or an Amazon category")
    p.add_argument("--input", required=True, metavar="RAW_DIR", help="folder of the raw files (--download writes them there)")
    p.add_argument("--output", default="dataset/downstream", metavar="OUT_DIR",
                   help="writes OUT_DIR/NAME/NAME.* (default: %(default)s; pre-training domains: dataset/pretrain)")
    p.add_argument("--format", dest="fmt", choices=["amazon2023", "amazon2018"], default="amazon2023",
                   help="raw file layout (default: %(default)s; --download needs amazon2023)")
    p.add_argument("--download", action="store_true", help="fetch the Amazon Reviews 2023 files of the category first")
    p.add_argument("--base-url", default=BASE_URL, help="where --download fetches from (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="--download: resumed attempts per file (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60, help="--download: seconds without data before a retry")
    p.add_argument("--kcore", type=int, default=5, help="iterative user/item k-core (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=50, help="keep the last N items of each history (default: %(default)s)")
    p.add_argument("--text-encoder", default=None, metavar="PATH", help="text encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--images", default=None, metavar="DIR", help="download the item images into DIR and extract image features")
    p.add_argument("--clip", default=None, metavar="PATH", help="local CLIP model folder for --images")
    p.add_argument("--device", default="cpu", help="torch device of the encoders (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/NAME if it exists")
    p.set_defaults(func=lambda a: prepare(a) and 0)
