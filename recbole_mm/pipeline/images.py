"""``recbole-mm extract-image`` and ``recbole-mm download-images``.

``extract-image`` turns one image per item into ``<name>.<suffix>`` (default ``feat3CLS``):
raw little-endian float32, ``n_items x dim``, row i = item index i, with a CLIP vision tower
and its projection (``CLIPModel`` or ``CLIPVisionModelWithProjection`` saved in a local
folder; 512-d for ViT-B/32).  Images are preprocessed with PIL + numpy (no torchvision):
RGB, shortest side resized to the model's image size (bicubic), centre crop, CLIP mean/std
(or the folder's ``preprocessor_config.json``).  An item whose image is missing or unreadable
gets an all-zero row (the models treat it as a missing modality); both are counted and
reported.  ``--backend open_clip`` uses open_clip instead when it is installed.

``--images DIR`` holds one file per item, named by its raw id (``B00XYZ.jpg``) or by its
item index (``17.png``), with any of the extensions in ``IMAGE_EXTS``.

``download-images`` fetches the URLs of ``<name>.imageurl`` (written by ``preprocess``) into
``DIR/<raw id><ext>``: a local cache (files already there are not fetched again), retries
with exponential backoff, atomic writes, failures listed in ``DIR/failed.tsv``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlparse

import numpy as np

from recbole_mm.pipeline.common import PipelineError, atomic_write_bytes, dataset_file, progress, read_items

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------
# preprocessing and encoders
# ---------------------------------------------------------------------------------------
def preprocess_image(img, size: int, crop: int | None = None, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """PIL image -> float32 ``[3, crop, crop]``: RGB, shortest side to ``size`` (bicubic),
    centre crop, scaled to [0, 1] and normalised."""
    from PIL import Image

    crop = crop or size
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return arr.transpose(2, 0, 1).copy()


class ClipImageEncoder:
    """transformers CLIP vision tower + projection from a local folder."""

    def __init__(self, path: str, device: str = "cpu"):
        if not path:
            raise PipelineError(
                "extract-image needs --encoder PATH: a local folder with a CLIP model saved by transformers "
                "(no package ships CLIP weights, and nothing is downloaded)"
            )
        if not os.path.isdir(path):
            raise PipelineError(f"{path}: encoder folder not found")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise PipelineError(f"{path}: not a transformers model folder (no config.json)")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        model_type = cfg.get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise PipelineError(f"{path}: model_type {model_type!r} is not a CLIP model (clip or clip_vision_model)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        self.torch, self.device = torch, device
        cls = CLIPModel if model_type == "clip" else CLIPVisionModelWithProjection
        try:
            self.model = cls.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: cannot load the CLIP model ({str(e).splitlines()[0]})") from None
        vcfg = self.model.config.vision_config if model_type == "clip" else self.model.config
        self.dim = int(self.model.config.projection_dim)
        self.size = self.crop = int(vcfg.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp, encoding="utf-8") as f:
                p = json.load(f)
            size, crop = p.get("size"), p.get("crop_size")
            if isinstance(size, dict):
                size = size.get("shortest_edge") or size.get("height")
            if isinstance(crop, dict):
                crop = crop.get("height")
            self.size = int(size or self.size)
            self.crop = int(crop or self.size)
            self.mean = tuple(p.get("image_mean", self.mean))
            self.std = tuple(p.get("image_std", self.std))
        self.path = os.path.abspath(path)

    def prepare(self, img) -> np.ndarray:
        return preprocess_image(img, self.size, self.crop, self.mean, self.std)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device)
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=x)
                out = getattr(out, "pooler_output", out)
            else:
                out = self.model(pixel_values=x).image_embeds
            return out.float().cpu().numpy()


class OpenClipImageEncoder:
    """open_clip backend (optional): ``--encoder ARCH:CHECKPOINT``."""

    def __init__(self, spec: str, device: str = "cpu"):
        try:
            import open_clip
        except ImportError:
            raise PipelineError("--backend open_clip: open_clip is not installed (it is optional; "
                                "the default transformers backend needs no extra package)") from None
        arch, sep, ckpt = (spec or "").partition(":")
        if not sep or not os.path.isfile(ckpt):
            raise PipelineError(f"--backend open_clip needs --encoder ARCH:CHECKPOINT_FILE, got {spec!r}")
        import torch

        self.torch, self.device = torch, device
        self.model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
        self.model.to(device).eval()
        self.dim = int(self.model.visual.output_dim)
        self.path = spec

    def prepare(self, img) -> np.ndarray:
        return self.transform(img.convert("RGB")).numpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode_image(self.torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()


# ---------------------------------------------------------------------------------------
# extract-image
# ---------------------------------------------------------------------------------------
def _index_folder(images: str) -> dict[str, str]:
    """file stem -> path, for the image files of ``images``."""
    out = {}
    for entry in sorted(os.listdir(images)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTS and stem not in out:
            out[stem] = os.path.join(images, entry)
    return out


def extract_image_features(
    dataset: str,
    images: str,
    encoder: str | None = None,
    suffix: str = "feat3CLS",
    batch_size: int = 32,
    backend: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    show_progress: bool | None = None,
    log=print,
) -> dict:
    """Encode one image per item of ``dataset`` into ``<name>.<suffix>``; returns a report."""
    from PIL import Image, UnidentifiedImageError

    raws = read_items(dataset)
    if not os.path.isdir(images):
        raise PipelineError(f"{images}: images folder not found")
    if batch_size < 1:
        raise PipelineError("--batch-size must be >= 1")
    final = dataset_file(dataset, suffix)
    if os.path.exists(final) and not overwrite:
        raise PipelineError(f"{final}: already exists (use --overwrite to replace it)")
    if backend == "open_clip":
        enc = OpenClipImageEncoder(encoder, device)
    elif backend in ("auto", "transformers"):
        enc = ClipImageEncoder(encoder, device)
    else:
        raise PipelineError(f"--backend must be auto, transformers or open_clip, got {backend!r}")

    files = _index_folder(images)
    table = np.zeros((len(raws), enc.dim), dtype="<f4")
    missing, unreadable = [], []
    rows, pixels = [], []

    def flush():
        if rows:
            table[rows] = enc.encode(np.stack(pixels))
            rows.clear()
            pixels.clear()

    bar = progress(range(len(raws)), desc=f"extract-image {os.path.basename(final)}", unit=" item",
                   disable=None if show_progress is None else not show_progress)
    for i in bar:
        path = files.get(raws[i]) or files.get(str(i))
        if path is None:
            missing.append(raws[i])
            continue
        try:
            with Image.open(path) as img:
                img.load()
                pixels.append(enc.prepare(img))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            unreadable.append(f"{os.path.basename(path)} ({type(e).__name__})")
            continue
        rows.append(i)
        if len(rows) == batch_size:
            flush()
    flush()
    if not np.isfinite(table).all():
        raise PipelineError(f"{enc.path}: the encoder produced NaN/Inf values")
    atomic_write_bytes(final, table.tobytes())
    found = len(raws) - len(missing) - len(unreadable)
    report = {"path": os.path.abspath(final), "n_items": len(raws), "dim": enc.dim, "found": found,
              "missing": len(missing), "unreadable": len(unreadable), "encoder": enc.path}
    log(f"{os.path.basename(final)}: {len(raws):,} items x {enc.dim}; {found:,} images encoded, "
        f"{len(missing):,} missing, {len(unreadable):,} unreadable (all-zero rows) -> {report['path']}")
    if missing:
        log(f"  missing (first {min(5, len(missing))}): {', '.join(missing[:5])}")
    if unreadable:
        log(f"  unreadable (first {min(5, len(unreadable))}): {', '.join(unreadable[:5])}")
    return report


# ---------------------------------------------------------------------------------------
# download-images
# ---------------------------------------------------------------------------------------
def read_image_urls(dataset: str) -> list[tuple[str, str]]:
    path = dataset_file(dataset, "imageurl")
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: missing (preprocess writes it when the metadata has image URLs)")
    out = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if header != "item_id:token\turl:token":
            raise PipelineError(f"{path}:1: header must be 'item_id:token<TAB>url:token', got {header[:60]!r}")
        for lineno, line in enumerate(f, 2):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise PipelineError(f"{path}:{lineno}: expected '<raw item id>\\t<url>', got {line[:80]!r}")
            out.append((parts[0], parts[1]))
    return out


def _ext(url: str) -> str:
    ext = os.path.splitext(urlparse(url).path)[1].lower()
    return ext if ext in IMAGE_EXTS else ".jpg"


def _fetch(session, url: str, dest: str, retries: int, timeout: float, backoff: float) -> str | None:
    """Download to ``dest`` atomically; returns None on success, else the last error."""
    import requests

    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = session.get(url, timeout=timeout)
            if r.status_code != 200:
                error = f"HTTP {r.status_code}"
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    return error  # not worth retrying
                continue
            if not r.content:
                error = "empty response"
                continue
            fd, tmp = tempfile.mkstemp(prefix=".dl-", suffix=".tmp", dir=os.path.dirname(dest))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(r.content)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return None
        except requests.RequestException as e:
            error = type(e).__name__
    return error


def download_images(dataset: str, output: str, retries: int = 3, timeout: float = 20, workers: int = 8,
                    backoff: float = 0.5, show_progress: bool | None = None, log=print) -> dict:
    """Fetch the URLs of ``<name>.imageurl`` into ``output``; returns a report."""
    import requests

    urls = read_image_urls(dataset)
    os.makedirs(output, exist_ok=True)
    have = _index_folder(output)
    todo = [(raw, url) for raw, url in urls if raw not in have]
    failed: list[tuple[str, str, str]] = []
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=workers, pool_maxsize=workers)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_fetch, session, url, os.path.join(output, raw + _ext(url)), retries, timeout, backoff):
                   (raw, url) for raw, url in todo}
        for fut in progress(as_completed(futures), total=len(futures), desc="download-images", unit=" image",
                            disable=None if show_progress is None else not show_progress):
            err = fut.result()
            if err:
                failed.append((*futures[fut], err))
    failed.sort()
    fail_path = os.path.join(output, "failed.tsv")
    if failed:
        atomic_write_bytes(fail_path, "".join(f"{r}\t{u}\t{e}\n" for r, u, e in failed).encode("utf-8"))
    elif os.path.exists(fail_path):
        os.unlink(fail_path)
    report = {"total": len(urls), "cached": len(urls) - len(todo), "downloaded": len(todo) - len(failed),
              "failed": len(failed)}
    log(f"download-images: {report['total']:,} URLs, {report['downloaded']:,} downloaded, {report['cached']:,} "
        f"already cached, {report['failed']:,} failed" + (f" (listed in {fail_path})" if failed else ""))
    return report


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "extract-image",
        help="item images -> .feat3CLS with a local CLIP vision tower",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, metavar="OUT_DIR/NAME", help="dataset folder with <name>.item2index")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="one image per item, named <raw item id>.<ext> or <item index>.<ext>")
    p.add_argument("--encoder", default=None, metavar="PATH",
                   help="local CLIP folder (transformers CLIPModel or CLIPVisionModelWithProjection); "
                        "with --backend open_clip: ARCH:CHECKPOINT_FILE")
    p.add_argument("--suffix", default="feat3CLS", help="output file suffix (default: feat3CLS)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--backend", choices=["auto", "transformers", "open_clip"], default="auto",
                   help="auto/transformers: transformers CLIP; open_clip: only when open_clip is installed (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing feature file")
    p.set_defaults(func=lambda a: extract_image_features(
        a.dataset, a.images, a.encoder, a.suffix, a.batch_size, a.backend, a.device, a.overwrite) and 0)

    d = sub.add_parser(
        "download-images",
        help="download the item images listed in <name>.imageurl (cached, retried)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--dataset", required=True, metavar="OUT_DIR/NAME", help="dataset folder with <name>.imageurl")
    d.add_argument("--output", required=True, metavar="DIR", help="image cache folder: DIR/<raw item id>.<ext>")
    d.add_argument("--retries", type=int, default=3, help="retries per URL after the first try (default: 3)")
    d.add_argument("--timeout", type=float, default=20, help="seconds per request (default: 20)")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads (default: 8)")
    d.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each retry (default: 0.5)")
    d.set_defaults(func=lambda a: download_images(a.dataset, a.output, a.retries, a.timeout, a.workers, a.backoff) and 0)
