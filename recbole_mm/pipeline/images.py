"""``recbole-mm extract-image`` and ``recbole-mm download-images``.

``extract-image`` turns one image per item into ``<name>.<suffix>`` (default ``feat3CLS``):
raw little-endian float32, ``n_items x dim``, row i = item index i of ``<name>.item2index``,
encoded by a CLIP vision tower and its projection (a ``CLIPModel`` or
``CLIPVisionModelWithProjection`` saved by transformers in a local folder; 512-d for
ViT-B/32).  Images are preprocessed with PIL + numpy, no torchvision, exactly like CLIP's
own pipeline: RGB, shortest side resized to the model's image size (bicubic), centre crop,
scaled to [0, 1], normalised with the CLIP mean/std (or those of the folder's
``preprocessor_config.json``).  An item whose image is missing or unreadable (absent,
zero bytes, truncated, not an image) gets an all-zero row, which the models treat as a
missing modality; both are counted and reported.  ``--backend open_clip`` uses an
open_clip model instead, when the optional open_clip package is installed.

``--images DIR`` holds one file per item, named by its raw item id (``B00XYZ.jpg``) or,
failing that, by its item index (``17.png``); extensions: .jpg .jpeg .png .webp .gif .bmp.

``download-images`` fetches the URLs of ``<name>.imageurl`` (written by ``preprocess`` when
the metadata has image URLs) into ``DIR/<raw item id><ext>``, which is a local cache: files
already there are not fetched again.  Every request is retried with exponential backoff,
every file is written atomically (an interrupted run never leaves a partial image), and
the URLs that still fail are listed in ``DIR/failed.tsv`` and skipped by later runs unless
``--overwrite-failed`` is given.

Nothing is ever downloaded from a model hub: encoders are read from local folders only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Protocol
from urllib.parse import urlparse

import numpy as np

from recbole_mm.data.readers import DataValidationError
# shared with the models (recbole_mm.encoders); the old private names stay importable from here
from recbole_mm.encoders import BICUBIC, CLIP_MEAN, CLIP_STD, IMAGE_EXTS, preprocess_image  # noqa: F401
from recbole_mm.encoders import decode_image as _decode
from recbole_mm.encoders import index_image_folder as _index_folder
from recbole_mm.encoders import quiet_transformers as _quiet_transformers
from recbole_mm.pipeline.common import PipelineError, dataset_file, progress, read_items
from recbole_mm.utils import atomic_write

IMAGEURL_HEADER = "item_id:token\turl:token"
FAILED_FILE = "failed.tsv"
FAILED_HEADER = "item_id\turl\treason"
SHOW_FIRST = 5  # how many missing items / unreadable files / failed URLs a report names

Log = Callable[[str], None]


def _items(dataset: str) -> list[str]:
    """Raw item ids in index order; every problem is a one-line :class:`PipelineError`."""
    try:
        return read_items(dataset)
    except DataValidationError as e:
        raise PipelineError(str(e)) from None


# ---------------------------------------------------------------------------------------
# preprocessing and encoders
# ---------------------------------------------------------------------------------------
class ImageEncoder(Protocol):
    """What :func:`extract_image_features` needs from a backend."""

    dim: int
    path: str

    def prepare(self, img) -> np.ndarray:
        """PIL image -> float32 ``[3, H, W]``."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``[B, 3, H, W]`` -> float32 ``[B, dim]``."""


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def _edge(value, *keys: str) -> int | None:
    """An image size from a preprocessor config: an int, or the first of ``keys`` in a dict."""
    if isinstance(value, dict):
        value = next((value[k] for k in keys if value.get(k)), None)
    return int(value) if value else None


class ClipImageEncoder:
    """transformers CLIP vision tower + projection, from a local folder (never downloaded)."""

    def __init__(self, path: str | None, device: str = "cpu"):
        if not path:
            raise PipelineError(
                "extract-image needs --encoder PATH: a local folder holding a CLIP model saved by transformers "
                "(CLIPModel or CLIPVisionModelWithProjection, e.g. openai/clip-vit-base-patch32); no package ships "
                "CLIP weights and nothing is downloaded"
            )
        if not os.path.isdir(path):
            raise PipelineError(f"{path}: encoder folder not found")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise PipelineError(f"{path}: not a transformers model folder (no config.json)")
        model_type = _load_json(cfg_path).get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise PipelineError(f"{path}: model_type {model_type!r} is not a CLIP model "
                                "(expected clip or clip_vision_model)")
        import torch
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        self.torch, self.device, self.path = torch, device, os.path.abspath(path)
        cls = CLIPModel if model_type == "clip" else CLIPVisionModelWithProjection
        try:
            with _quiet_transformers():
                model, info = cls.from_pretrained(self.path, local_files_only=True, dtype=torch.float32,
                                                  output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, a corrupt safetensors file, ...
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PipelineError(f"{path}: cannot load the CLIP model ({why})") from None
        # transformers initialises missing weights at random with a mere warning: refuse that for the image half
        lost = [k for k in info.get("missing_keys", ()) if k.startswith(("vision_model.", "visual_projection."))]
        if lost:
            raise PipelineError(f"{path}: the checkpoint lacks {len(lost)} weights of the vision tower/projection "
                                f"(e.g. {sorted(lost)[0]}); is it a CLIPVisionModel without projection?")
        try:
            self.model = model.to(device).eval()
        except (RuntimeError, AssertionError, ValueError) as e:
            raise PipelineError(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
        vcfg = model.config.vision_config if model_type == "clip" else model.config
        self.dim = int(model.config.projection_dim)
        self.size = self.crop = int(vcfg.image_size)
        self.resize_to: tuple[int, int] | None = None
        self.mean, self.std, self.resample = CLIP_MEAN, CLIP_STD, BICUBIC
        pp_path = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp_path):
            pp = _load_json(pp_path)
            size = pp.get("size")
            if isinstance(size, dict) and not size.get("shortest_edge") and size.get("height") and size.get("width"):
                self.resize_to = (int(size["height"]), int(size["width"]))
                self.size = min(self.resize_to)
            else:
                self.size = _edge(size, "shortest_edge") or self.size
            self.crop = _edge(pp.get("crop_size"), "height", "width") or self.size
            self.mean = tuple(pp.get("image_mean") or self.mean)
            self.std = tuple(pp.get("image_std") or self.std)
            self.resample = pp.get("resample", self.resample)
            if len(self.mean) != 3 or len(self.std) != 3 or self.resample not in range(6):
                raise PipelineError(f"{pp_path}: image_mean/image_std need 3 values and resample a PIL filter "
                                    f"code 0-5, got {self.mean}, {self.std}, {self.resample!r}")

    def prepare(self, img) -> np.ndarray:
        return preprocess_image(img, self.size, self.crop, self.mean, self.std, self.resample, self.resize_to)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device)
            if hasattr(self.model, "get_image_features"):  # CLIPModel
                out = self.model.get_image_features(pixel_values=x)
                out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
            else:  # CLIPVisionModelWithProjection
                out = self.model(pixel_values=x).image_embeds
            return out.float().cpu().numpy()


class OpenClipImageEncoder:
    """Optional open_clip backend: ``--encoder ARCH:CHECKPOINT_FILE`` (preprocessing stays ours)."""

    def __init__(self, spec: str | None, device: str = "cpu"):
        try:
            import open_clip
        except ImportError:
            raise PipelineError("--backend open_clip: the open_clip package is not installed (it is optional; "
                                "the default transformers backend needs no extra package)") from None
        arch, sep, ckpt = (spec or "").partition(":")
        if not sep or not arch or not os.path.isfile(ckpt):
            raise PipelineError(f"--backend open_clip needs --encoder ARCH:CHECKPOINT_FILE (an existing local file), "
                                f"got {spec!r}")
        import torch

        self.torch, self.device, self.path = torch, device, spec
        try:
            model = open_clip.create_model_and_transforms(arch, pretrained=ckpt)[0]
        except (RuntimeError, ValueError, OSError) as e:
            raise PipelineError(f"{spec}: cannot load the open_clip model ({str(e).strip().splitlines()[0]})") from None
        self.model = model.to(device).eval()
        visual = model.visual
        size = visual.image_size
        self.size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
        self.dim = int(visual.output_dim)

    def prepare(self, img) -> np.ndarray:
        return preprocess_image(img, self.size, self.size, self.mean, self.std)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode_image(self.torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()


def load_image_encoder(encoder: str | None, backend: str = "auto", device: str = "cpu") -> ImageEncoder:
    """The encoder of ``--backend``: ``auto``/``transformers`` (a local CLIP folder) or ``open_clip``."""
    if backend in ("auto", "transformers"):
        return ClipImageEncoder(encoder, device)
    if backend == "open_clip":
        return OpenClipImageEncoder(encoder, device)
    raise PipelineError(f"--backend must be auto, transformers or open_clip, got {backend!r}")


# ---------------------------------------------------------------------------------------
# extract-image
# ---------------------------------------------------------------------------------------
def _first(names: list[str]) -> str:
    more = f", ... ({len(names) - SHOW_FIRST} more)" if len(names) > SHOW_FIRST else ""
    return ", ".join(names[:SHOW_FIRST]) + more


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
    log: Log = print,
) -> dict:
    """Encode one image per item of ``dataset`` into ``<dataset>/<name>.<suffix>``.

    Returns the report ``{path, n_items, dim, found, missing, unreadable, encoder, backend}``
    (``found`` images encoded, ``missing`` items without a file, ``unreadable`` files that
    could not be decoded; the last two have all-zero rows).  Nothing is written when it
    fails, and an existing output is kept unless ``overwrite``.
    """
    if not suffix or os.sep in suffix or "/" in suffix:
        raise PipelineError(f"--suffix must be a plain file suffix such as feat3CLS, got {suffix!r}")
    if batch_size < 1:
        raise PipelineError("--batch-size must be >= 1")
    raws = _items(dataset)
    if not os.path.isdir(images):
        raise PipelineError(f"{images}: images folder not found")
    final = dataset_file(dataset, suffix)
    if os.path.exists(final) and not overwrite:
        raise PipelineError(f"{final}: already exists (use --overwrite to replace it)")
    files = _index_folder(images)
    enc = load_image_encoder(encoder, backend, device)

    n = len(raws)
    table = np.zeros((n, enc.dim), dtype="<f4")
    missing: list[str] = []
    unreadable: list[str] = []
    used: set[str] = set()
    rows: list[int] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if rows:
            out = enc.encode(np.stack(pixels))
            if out.shape != (len(rows), enc.dim) or not np.isfinite(out).all():
                raise PipelineError(f"{enc.path}: the encoder returned {out.shape} (expected "
                                    f"{(len(rows), enc.dim)}) or non-finite values")
            table[rows] = out
            rows.clear()
            pixels.clear()

    bar = progress(range(n), desc=f"extract-image {os.path.basename(final)}", unit=" item",
                   disable=None if show_progress is None else not show_progress)
    for i in bar:
        path = files.get(raws[i]) or files.get(str(i))
        if path is None:
            missing.append(raws[i])
            continue
        used.add(path)
        try:
            img = _decode(path)
        except Exception as e:  # noqa: BLE001 - any decoding failure only costs this item its image
            unreadable.append(f"{os.path.basename(path)} ({type(e).__name__}: {str(e)[:60]})")
            continue
        pixels.append(enc.prepare(img))
        rows.append(i)
        if len(rows) == batch_size:
            flush()
    flush()
    found = n - len(missing) - len(unreadable)
    if found == 0:
        raise PipelineError(
            f"{images}: no readable image for any of the {n:,} items (files must be named <raw item id><ext> or "
            f"<item index><ext>, e.g. {raws[0]}.jpg or 0.jpg; {len(files):,} image files there, "
            f"{len(unreadable):,} unreadable); nothing written"
        )
    atomic_write(final, table.tobytes())
    report = {"path": os.path.abspath(final), "n_items": n, "dim": enc.dim, "found": found,
              "missing": len(missing), "unreadable": len(unreadable), "encoder": enc.path, "backend": backend}
    log(f"{os.path.basename(final)}: {n:,} items x {enc.dim}; {found:,} images encoded, {len(missing):,} missing, "
        f"{len(unreadable):,} unreadable (all-zero rows) -> {report['path']}")
    if missing:
        log(f"  missing: {_first(missing)}")
    if unreadable:
        log(f"  unreadable: {_first(unreadable)}")
    if len(files) > len(used):
        log(f"  {len(files) - len(used):,} image files in {images} belong to no item")
    return report


# ---------------------------------------------------------------------------------------
# download-images
# ---------------------------------------------------------------------------------------
def read_image_urls(dataset: str) -> list[tuple[str, str]]:
    """``(raw item id, url)`` pairs of ``<dataset>/<name>.imageurl``, validated."""
    path = dataset_file(dataset, "imageurl")
    if not os.path.isdir(dataset):
        raise PipelineError(f"{dataset}: dataset folder not found")
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: missing (preprocess writes it when the metadata has image URLs)")
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if header != IMAGEURL_HEADER:
            raise PipelineError(f"{path}:1: header must be 'item_id:token<TAB>url:token', got {header[:60]!r}")
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise PipelineError(f"{path}:{lineno}: expected '<raw item id>\\t<url>', got {line[:80]!r}")
            if parts[0] in seen:
                raise PipelineError(f"{path}:{lineno}: item {parts[0]!r} listed twice (also line {seen[parts[0]]})")
            seen[parts[0]] = lineno
            out.append((parts[0], parts[1]))
    return out


def read_failed(output: str) -> dict[str, tuple[str, str]]:
    """raw id -> (url, reason) of ``DIR/failed.tsv`` (empty when there is none)."""
    path = os.path.join(output, FAILED_FILE)
    out: dict[str, tuple[str, str]] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) == 3 and "\t".join(parts) != FAILED_HEADER:
                    out[parts[0]] = (parts[1], parts[2])
    return out


def _ext(url: str) -> str:
    ext = os.path.splitext(urlparse(url).path)[1].lower()
    return ext if ext in IMAGE_EXTS else ".jpg"


def _safe_name(raw: str) -> bool:
    return raw not in (".", "..") and not any(c in raw for c in ("/", "\\", "\0"))


def _is_image(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - whatever PIL raises, it is not a usable image
        return False


_sessions = threading.local()


def _session():
    """One ``requests.Session`` per worker thread (sessions are not thread-safe)."""
    import requests

    if not hasattr(_sessions, "s"):
        _sessions.s = requests.Session()
        _sessions.s.headers["User-Agent"] = "recbole-mm download-images"
    return _sessions.s


def _fetch(url: str, dest: str, retries: int, timeout: float, backoff: float) -> str | None:
    """Download ``url`` to ``dest`` atomically; ``None`` on success, else why it failed."""
    import requests

    error = "not tried"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = _session().get(url, timeout=timeout)
        except requests.Timeout:
            error = f"timeout after {timeout:g}s"
            continue
        except requests.RequestException as e:
            error = f"{type(e).__name__}: {str(e)[:80]}"
            continue
        if r.status_code != 200:
            error = f"HTTP {r.status_code}"
            if 400 <= r.status_code < 500 and r.status_code not in (408, 425, 429):
                return error  # the server says it will not work: not retried
            continue
        if not r.content:
            error = "empty response"
            continue
        if not _is_image(r.content):
            return f"not an image ({r.headers.get('Content-Type', 'no Content-Type')})"
        atomic_write(dest, r.content, fsync=False)  # many small files: no fsync each
        return None
    return error


def _remove_stale_temps(output: str, age_s: float = 3600.0) -> None:
    """Temporary files of runs killed over an hour ago (never those of a live run)."""
    now = time.time()
    with os.scandir(output) as it:
        for e in it:
            if e.name.startswith(".") and ".tmp-" in e.name and now - e.stat().st_mtime > age_s:  # atomic_write's
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def download_images(
    dataset: str,
    output: str,
    retries: int = 3,
    timeout: float = 20,
    workers: int = 8,
    backoff: float = 0.5,
    overwrite_failed: bool = False,
    show_progress: bool | None = None,
    log: Log = print,
) -> dict:
    """Fetch the image URLs of ``<dataset>/<name>.imageurl`` into ``output/<raw id><ext>``.

    Files already in ``output`` are kept (a cache); URLs listed in ``output/failed.tsv`` by
    an earlier run are skipped unless ``overwrite_failed``.  Returns the report
    ``{total, downloaded, cached, failed, skipped_failed, failed_path}``: ``failed`` counts
    every URL now in ``failed.tsv`` (``skipped_failed`` of them were not tried again).
    """
    if retries < 0 or workers < 1 or timeout <= 0 or backoff < 0:
        raise PipelineError("need --retries >= 0, --workers >= 1, --timeout > 0 and --backoff >= 0")
    urls = read_image_urls(dataset)
    if os.path.exists(output) and not os.path.isdir(output):
        raise PipelineError(f"{output}: exists and is not a folder")
    os.makedirs(output, exist_ok=True)
    _remove_stale_temps(output)
    have = _index_folder(output)
    old_failed = read_failed(output)
    failed: dict[str, tuple[str, str]] = {}
    todo: list[tuple[str, str]] = []
    skipped = 0
    for raw, url in urls:
        if raw in have:
            continue
        if not _safe_name(raw):
            failed[raw] = (url, "item id is not usable as a file name")
        elif not overwrite_failed and old_failed.get(raw, ("",))[0] == url:
            failed[raw] = old_failed[raw]
            skipped += 1
        else:
            todo.append((raw, url))
    cached = sum(raw in have for raw, _ in urls)
    fail_path = os.path.join(output, FAILED_FILE)

    def save_failed() -> None:
        if failed:
            lines = [FAILED_HEADER] + [f"{r}\t{u}\t{why}" for r, (u, why) in sorted(failed.items())]
            atomic_write(fail_path, ("\n".join(lines) + "\n").encode("utf-8"))
        elif os.path.exists(fail_path):
            os.unlink(fail_path)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(_fetch, url, os.path.join(output, raw + _ext(url)), retries, timeout, backoff):
                   (raw, url) for raw, url in todo}
        bar = progress(as_completed(futures), total=len(futures), desc="download-images", unit=" image",
                       disable=None if show_progress is None else not show_progress)
        for fut in bar:
            raw, url = futures[fut]
            err = fut.result()
            if err:
                failed[raw] = (url, err)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running downloads finish (atomically), queued ones are dropped
        with contextlib.suppress(OSError):
            save_failed()
        raise
    pool.shutdown(wait=True)
    save_failed()

    n_failed = len(failed)
    report = {"total": len(urls), "downloaded": sum(raw not in failed for raw, _ in todo), "cached": cached,
              "failed": n_failed, "skipped_failed": skipped,
              "failed_path": os.path.abspath(fail_path) if failed else None}
    log(f"download-images: {report['total']:,} URLs: {report['downloaded']:,} downloaded, {cached:,} already there, "
        f"{n_failed:,} failed" + (f" ({skipped:,} of them from an earlier run, not retried; --overwrite-failed "
                                  f"retries them)" if skipped else "")
        + (f"; listed in {fail_path}" if failed else ""))
    if failed:
        log(f"  failed: {_first([f'{r} ({why})' for r, (_, why) in sorted(failed.items())])}")
    return report


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
EXTRACT_DESCRIPTION = """\
Encode one image per item into <name>.<suffix> (default feat3CLS): raw little-endian float32,
n_items x dim, row i = item index i of <name>.item2index, with a CLIP vision tower and its
projection (512-d for ViT-B/32) loaded from a local folder.

Images are preprocessed with PIL + numpy like CLIP's own pipeline: RGB, shortest side resized
to the model's image size (bicubic), centre crop, CLIP mean/std (or the values of the folder's
preprocessor_config.json).  An item whose image is missing or unreadable (zero bytes,
truncated, not an image) gets an all-zero row; both are counted and reported.  An existing
output is never replaced without --overwrite, and a failed run writes nothing.
"""

EXTRACT_EPILOG = """
examples:
  recbole-mm extract-image --dataset out/Scientific --images out/Scientific_images \\
      --encoder /models/clip-vit-base-patch32
  recbole-mm extract-image --dataset out/Scientific --images imgs/ --backend open_clip \\
      --encoder ViT-B-32:/models/open_clip_vit_b32.bin --suffix feat4CLS --overwrite

A CLIP folder is what transformers' save_pretrained writes (config.json + model.safetensors
[+ preprocessor_config.json]); no package ships CLIP weights and nothing is downloaded.
"""

DOWNLOAD_DESCRIPTION = """\
Download the item images listed in <name>.imageurl (written by preprocess when the metadata
has image URLs) into DIR/<raw item id><ext> (ext from the URL path, default .jpg).

DIR is a cache: images already there are not fetched again.  Each request is retried with
exponential backoff; each file is written atomically, so an interrupted run never leaves a
partial image.  URLs that still fail are listed in DIR/failed.tsv (item id, url, reason) and
skipped by later runs unless --overwrite-failed.  Exits 0 even when some downloads failed
(they are reported); then run extract-image --images DIR.
"""

DOWNLOAD_EPILOG = """
example:
  recbole-mm download-images --dataset out/Scientific --output out/Scientific_images
  recbole-mm extract-image --dataset out/Scientific --images out/Scientific_images --encoder /models/clip

Run it again to resume: the images already in DIR are not downloaded again.
"""


def _extract_main(a: argparse.Namespace) -> int:
    extract_image_features(a.dataset, a.images, a.encoder, a.suffix, a.batch_size, a.backend, a.device, a.overwrite)
    return 0


def _download_main(a: argparse.Namespace) -> int:
    download_images(a.dataset, a.output, a.retries, a.timeout, a.workers, a.backoff, a.overwrite_failed)
    return 0


def register(sub) -> None:
    """Add ``extract-image`` and ``download-images`` to the ``recbole-mm`` sub-commands."""
    p = sub.add_parser(
        "extract-image",
        help="item images -> .feat3CLS with a local CLIP vision tower (missing images: zero rows)",
        description=EXTRACT_DESCRIPTION,
        epilog=EXTRACT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, metavar="OUT_DIR/NAME",
                   help="dataset folder with <name>.item2index; the features go to <name>.<suffix> there")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="folder with one image per item, named <raw item id><ext> or else <item index><ext> "
                        f"({' '.join(IMAGE_EXTS)})")
    p.add_argument("--encoder", default=None, metavar="PATH",
                   help="local folder with a transformers CLIPModel or CLIPVisionModelWithProjection (required; "
                        "there is no default); with --backend open_clip: ARCH:CHECKPOINT_FILE, e.g. "
                        "ViT-B-32:/models/clip.bin")
    p.add_argument("--suffix", default="feat3CLS", help="output file suffix: <name>.<suffix> (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "transformers", "open_clip"], default="auto",
                   help="auto = transformers (a local CLIP folder); open_clip only when the optional open_clip "
                        "package is installed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing <name>.<suffix> (default: refuse and stop)")
    p.set_defaults(func=_extract_main)

    d = sub.add_parser(
        "download-images",
        help="download the item images listed in <name>.imageurl (cached, retried, resumable)",
        description=DOWNLOAD_DESCRIPTION,
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--dataset", required=True, metavar="OUT_DIR/NAME", help="dataset folder with <name>.imageurl")
    d.add_argument("--output", required=True, metavar="DIR",
                   help="image folder (created if needed): DIR/<raw item id><ext>, then extract-image --images DIR")
    d.add_argument("--retries", type=int, default=3, metavar="N",
                   help="extra tries per URL after a timeout, connection error or HTTP 5xx/408/429; other 4xx "
                        "are not retried (default: %(default)s)")
    d.add_argument("--timeout", type=float, default=20, metavar="S",
                   help="seconds to wait for a server per request (default: %(default)s)")
    d.add_argument("--workers", type=int, default=8, metavar="N", help="parallel downloads (default: %(default)s)")
    d.add_argument("--backoff", type=float, default=0.5, metavar="S",
                   help="delay before the first retry in seconds, doubled at each further retry "
                        "(default: %(default)s)")
    d.add_argument("--overwrite-failed", dest="overwrite_failed", action="store_true",
                   help="try again the URLs that DIR/failed.tsv lists from an earlier run (default: skip them)")
    d.set_defaults(func=_download_main)
