"""``extract-image`` (a tiny random CLIP saved to a local folder) and ``download-images`` (a local HTTP server).

Nothing here touches the network beyond 127.0.0.1 or downloads a model: the CLIP encoders are
built from a config and round-tripped through ``save_pretrained`` / ``from_pretrained``,
which is the code path real CLIP weights in a local folder take.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL", reason="pillow (the extract extra) is not installed")
pytest.importorskip("transformers", reason="transformers (the extract extra) is not installed")
pytest.importorskip("requests", reason="requests (the extract extra) is not installed")

from PIL import Image  # noqa: E402

from recbole_mm.pipeline import images as images_mod  # noqa: E402
from recbole_mm.pipeline.common import PipelineError  # noqa: E402
from recbole_mm.pipeline.images import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    download_images,
    extract_image_features,
    preprocess_image,
)

N_ITEMS = 12
DIM = 16
MISSING = {4, 9}  # no file at all
UNREADABLE = {6: "garbage", 7: "zero-byte", 10: "truncated"}
QUIET = dict(log=lambda m: None, show_progress=False)


def _cli(argv: list[str]) -> int:
    """``recbole-mm argv``."""
    from recbole_mm.cli import main

    return main(argv)


def _dataset(root, name: str = "Img", n: int = N_ITEMS):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.item2index").write_text("".join(f"R{i:03d}\t{i}\n" for i in range(n)))
    return folder


def _image(i: int) -> Image.Image:
    """A distinct image per i: random noise, non-square, of varying size and mode."""
    rng = np.random.default_rng(i)
    w, h = 24 + 7 * (i % 12), 45 - 2 * (i % 12)
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
    return img.convert(["RGB", "RGBA", "L"][i % 3])  # colour, alpha, grayscale


def _png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """Tiny random CLIPs saved like real ones: full CLIPModel, vision-only with the same weights, and bad folders."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=DIM,
    )
    root = tmp_path_factory.mktemp("clip")
    full = CLIPModel(cfg).eval()
    full.save_pretrained(root / "full")

    vcfg = CLIPVisionConfig(**{**cfg.vision_config.to_dict(), "projection_dim": DIM})
    vision = CLIPVisionModelWithProjection(vcfg)
    vision.load_state_dict({k: v for k, v in full.state_dict().items()
                            if k.startswith(("vision_model.", "visual_projection."))}, strict=True)
    vision.save_pretrained(root / "vision")
    CLIPVisionModel(vcfg).save_pretrained(root / "noproj")  # no projection: must be refused

    shutil.copytree(root / "full", root / "custom_pp")
    (root / "custom_pp" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}))

    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return root, full


@pytest.fixture
def image_dir(tmp_path):
    """Images of items 0..11: by raw id, item 2 by index, 4 and 9 missing, 6/7/10 unreadable."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_ITEMS):
        if i in MISSING:
            continue
        if UNREADABLE.get(i) == "garbage":
            (folder / f"R{i:03d}.jpg").write_bytes(b"not an image at all")
        elif UNREADABLE.get(i) == "zero-byte":
            (folder / f"R{i:03d}.png").write_bytes(b"")
        elif UNREADABLE.get(i) == "truncated":
            data = _png_bytes(i)
            (folder / f"R{i:03d}.png").write_bytes(data[: len(data) // 2])
        elif i == 2:
            _image(i).save(folder / "2.png")  # named by item index
        elif i == 5:
            _image(i).convert("RGB").save(folder / f"R{i:03d}.JPEG", quality=90)  # other extension, upper case
        elif i == 8:
            _image(i).convert("RGB").save(folder / f"R{i:03d}.gif")  # palette image
        else:
            _image(i).save(folder / f"R{i:03d}.png")
    _image(99).save(folder / "3.png")  # a decoy: item 3 has R003.png, the raw id wins over the index
    (folder / "notes.txt").write_text("not an image file name")
    return folder


def _file_of(folder, i: int):
    names = [p for p in os.listdir(folder) if os.path.splitext(p)[0] == f"R{i:03d}"]
    return folder / (names[0] if names else f"{i}.png")


def _direct(model, img: Image.Image, size: int = 32, crop: int = 32, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    x = torch.from_numpy(preprocess_image(img, size, crop, mean, std)[None])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x)
    return getattr(out, "pooler_output", out)[0].numpy()


def _read(path, n: int = N_ITEMS) -> np.ndarray:
    assert os.path.getsize(path) == n * DIM * 4
    return np.fromfile(path, dtype="<f4").reshape(n, DIM)


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------
def test_preprocess_by_hand_and_like_transformers():
    rng = np.random.default_rng(0)
    arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    expected = ((arr / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    out = preprocess_image(Image.fromarray(arr), 32)
    assert out.dtype == np.float32 and out.shape == (3, 32, 32)
    assert np.allclose(out, expected, atol=1e-5)

    try:  # transformers' own PIL-only CLIP processor, when this version has one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        pytest.skip("this transformers has no PIL CLIP image processor to compare with")
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for (w, h) in [(45, 33), (24, 40), (70, 20), (17, 50), (100, 61), (33, 33), (20, 20)]:
        for mode in ("RGB", "RGBA", "L"):
            img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
            ref = proc(images=img, return_tensors="np")["pixel_values"][0]
            assert np.allclose(preprocess_image(img, 32), ref, atol=1e-5), (w, h, mode)


# ---------------------------------------------------------------------------------------
# extract-image
# ---------------------------------------------------------------------------------------
def test_extract_image_rows_align_with_items(tmp_path, clip_dirs, image_dir):
    root, model = clip_dirs
    ds = _dataset(tmp_path)
    msgs: list[str] = []
    rep = extract_image_features(str(ds), str(image_dir), str(root / "full"), batch_size=4,
                                 log=msgs.append, show_progress=False)
    found = N_ITEMS - len(MISSING) - len(UNREADABLE)
    assert rep["n_items"] == N_ITEMS and rep["dim"] == DIM
    assert (rep["found"], rep["missing"], rep["unreadable"]) == (found, 2, 3)
    assert rep["path"] == os.path.abspath(ds / "Img.feat3CLS")
    text = "\n".join(msgs)
    assert f"{found} images encoded, 2 missing, 3 unreadable" in text
    assert "missing: R004, R009" in text
    assert all(f"R{i:03d}" in text for i in UNREADABLE)  # the unreadable files are named
    assert "1 image files" in text  # the decoy 3.png belongs to no item

    feats = _read(ds / "Img.feat3CLS")
    assert np.isfinite(feats).all()
    zero = ~feats.any(1)
    assert set(np.flatnonzero(zero)) == MISSING | set(UNREADABLE)
    for i in set(range(N_ITEMS)) - MISSING - set(UNREADABLE):
        with Image.open(_file_of(image_dir, i)) as img:
            assert np.allclose(feats[i], _direct(model, img), atol=1e-5), i
    assert len({feats[i].tobytes() for i in np.flatnonzero(~zero)}) == found  # distinct images, distinct rows

    # batching does not move rows around
    extract_image_features(str(ds), str(image_dir), str(root / "full"), suffix="featB1", batch_size=1, **QUIET)
    assert np.allclose(_read(ds / "Img.featB1"), feats, atol=1e-5)

    # a vision-only checkpoint with the same weights gives the same rows
    extract_image_features(str(ds), str(image_dir), str(root / "vision"), suffix="featV", **QUIET)
    assert np.allclose(_read(ds / "Img.featV"), feats, atol=1e-5)


def test_extract_image_refuses_to_overwrite(tmp_path, clip_dirs, image_dir):
    root, _ = clip_dirs
    ds = _dataset(tmp_path)
    out = ds / "Img.feat3CLS"
    out.write_bytes(b"old")
    with pytest.raises(PipelineError, match="already exists.*--overwrite"):
        extract_image_features(str(ds), str(image_dir), str(root / "full"), **QUIET)
    assert out.read_bytes() == b"old"
    extract_image_features(str(ds), str(image_dir), str(root / "full"), overwrite=True, **QUIET)
    assert os.path.getsize(out) == N_ITEMS * DIM * 4


def test_extract_image_uses_preprocessor_config(tmp_path, clip_dirs, image_dir):
    root, model = clip_dirs
    ds = _dataset(tmp_path)
    extract_image_features(str(ds), str(image_dir), str(root / "custom_pp"), **QUIET)
    feats = _read(ds / "Img.feat3CLS")
    with Image.open(_file_of(image_dir, 0)) as img:
        expected = _direct(model, img, 40, 32, (0.5,) * 3, (0.25,) * 3)
        assert np.allclose(feats[0], expected, atol=1e-5)
        assert not np.allclose(feats[0], _direct(model, img), atol=1e-3)


def test_extract_image_cli_report_and_errors(tmp_path, clip_dirs, image_dir, capsys):
    root, _ = clip_dirs
    ds = _dataset(tmp_path)
    base = ["extract-image", "--dataset", str(ds), "--images", str(image_dir)]
    assert _cli(base + ["--encoder", str(root / "full"), "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "Img.feat3CLS: 12 items x 16; 7 images encoded, 2 missing, 3 unreadable" in out
    before = (ds / "Img.feat3CLS").read_bytes()

    def fails(argv: list[str], *needles: str) -> None:
        assert _cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line
        for needle in needles:
            assert needle in err, err

    fails(base + ["--encoder", str(root / "full")], "already exists", "--overwrite")
    fails(base + ["--encoder", str(tmp_path / "nope"), "--overwrite"], str(tmp_path / "nope"), "not found")
    fails(base + ["--overwrite"], "--encoder", "no package ships CLIP weights", "nothing is downloaded")
    fails(base + ["--encoder", str(root / "bert"), "--overwrite"], str(root / "bert"), "not a CLIP model")
    fails(base + ["--encoder", str(image_dir), "--overwrite"], "no config.json")
    fails(base + ["--encoder", str(root / "noproj"), "--overwrite"], "visual_projection")
    fails(["extract-image", "--dataset", str(ds), "--images", str(tmp_path / "noimg"), "--encoder",
           str(root / "full"), "--overwrite"], str(tmp_path / "noimg"), "images folder not found")
    fails(["extract-image", "--dataset", str(tmp_path / "nods"), "--images", str(image_dir), "--encoder",
           str(root / "full")], "dataset folder not found")
    if not torch.cuda.is_available():
        fails(base + ["--encoder", str(root / "full"), "--overwrite", "--device", "cuda"], "--device cuda")
    assert (ds / "Img.feat3CLS").read_bytes() == before  # no failure touched the output
    assert sorted(os.listdir(ds)) == ["Img.feat3CLS", "Img.item2index"]  # and left no temporary file

    # no image for any item: an error, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["extract-image", "--dataset", str(ds), "--images", str(empty), "--encoder", str(root / "full"),
           "--suffix", "featE"], "no readable image", "R000.jpg")
    assert not (ds / "Img.featE").exists()

    (ds / "Img.item2index").unlink()
    with pytest.raises(PipelineError, match="item2index"):
        extract_image_features(str(ds), str(image_dir), str(root / "full"), **QUIET)


def test_open_clip_backend_is_optional(tmp_path, image_dir):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed")
    ds = _dataset(tmp_path)
    with pytest.raises(PipelineError, match="open_clip package is not installed"):
        extract_image_features(str(ds), str(image_dir), "ViT-B-32:/x.bin", backend="open_clip", **QUIET)
    assert _cli(["extract-image", "--dataset", str(ds), "--images", str(image_dir), "--backend", "open_clip",
                 "--encoder", "ViT-B-32:/x.bin"]) == 2
    assert not (ds / "Img.feat3CLS").exists()


# ---------------------------------------------------------------------------------------
# download-images
# ---------------------------------------------------------------------------------------
class _Server:
    """127.0.0.1 server: /img/<i>.png and /img/3 (no extension) images, /missing.png 404 (until
    ``bodies`` gets it), /flaky.png 500 then image 0, /notimage.png an HTML page, /slow.png too slow."""

    def __init__(self, slow_s: float):
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.bodies = {f"/img/{i}.png": _png_bytes(i) for i in range(3)}
        self.bodies["/img/3"] = _png_bytes(3)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes = b"", ctype: str = "image/png") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def do_GET(self):  # noqa: N802 - the http.server API
                path = urlsplit(self.path).path
                with outer.lock:
                    outer.requests.append(path)
                    hits = outer.requests.count(path)
                if path == "/flaky.png" and hits == 1:
                    return self._send(500, b"try again", "text/plain")
                if path == "/flaky.png":
                    return self._send(200, outer.bodies["/img/0.png"])
                if path == "/notimage.png":
                    return self._send(200, b"<html>no image here</html>", "text/html")
                if path == "/slow.png":
                    time.sleep(slow_s)
                    return self._send(200, outer.bodies["/img/0.png"])
                body = outer.bodies.get(path)
                return self._send(404, b"", "text/plain") if body is None else self._send(200, body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests.count(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(slow_s=1.0)
    yield s
    s.close()


def test_download_retries_cache_failures_and_extraction(tmp_path, server, clip_dirs, capsys):
    root, model = clip_dirs
    ds = _dataset(tmp_path, n=10)
    urls = {0: "/img/0.png", 1: "/img/1.png?size=large", 2: "/img/2.png", 3: "/img/3", 4: "/img/4.png",
            5: "/missing.png", 6: "/flaky.png", 7: "/notimage.png", 8: "/slow.png"}  # item 9 has no URL
    (ds / "Img.imageurl").write_text("item_id:token\turl:token\n"
                                     + "".join(f"R{i:03d}\t{server.url}{u}\n" for i, u in urls.items()))
    out = tmp_path / "cache"
    out.mkdir()
    _image(4).save(out / "R004.png")  # already in the cache: never fetched
    kw = dict(retries=2, timeout=0.3, workers=4, backoff=0.01, **QUIET)

    rep = download_images(str(ds), str(out), **kw)
    assert {k: rep[k] for k in ("total", "downloaded", "cached", "failed")} == \
        {"total": 9, "downloaded": 5, "cached": 1, "failed": 3}
    assert server.count("/img/4.png") == 0
    assert server.count("/flaky.png") == 2  # 500 once, then retried successfully
    assert server.count("/missing.png") == 1  # a 404 is not retried
    assert server.count("/notimage.png") == 1
    assert server.count("/slow.png") == 3  # timed out, retried twice
    files = sorted(os.listdir(out))
    assert files == ["R000.png", "R001.png", "R002.png", "R003.jpg", "R004.png", "R006.png", "failed.tsv"]
    assert (out / "R006.png").read_bytes() == _png_bytes(0)
    lines = (out / "failed.tsv").read_text().splitlines()
    assert lines[0] == "item_id\turl\treason"
    by_id = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert sorted(by_id) == ["R005", "R007", "R008"]
    assert by_id["R005"][1:] == [f"{server.url}/missing.png", "HTTP 404"]
    assert by_id["R007"][2].startswith("not an image") and by_id["R008"][2].startswith("timeout")

    # a second run: everything is cached or a known failure, the server sees no request at all
    n_requests = len(server.requests)
    rep2 = download_images(str(ds), str(out), **kw)
    assert {k: rep2[k] for k in ("total", "downloaded", "cached", "failed", "skipped_failed")} == \
        {"total": 9, "downloaded": 0, "cached": 6, "failed": 3, "skipped_failed": 3}
    assert len(server.requests) == n_requests

    # --overwrite-failed tries the failures again; the missing image now exists
    server.bodies["/missing.png"] = _png_bytes(5)
    assert _cli(["download-images", "--dataset", str(ds), "--output", str(out), "--retries", "0",
                 "--timeout", "0.3", "--backoff", "0.01", "--overwrite-failed"]) == 0  # 0 despite 2 failures
    printed = capsys.readouterr().out
    assert "1 downloaded, 6 already there, 2 failed" in printed and "failed.tsv" in printed
    assert server.count("/missing.png") == 2 and server.count("/img/0.png") == 1  # cached files: no request
    assert sorted(line.split("\t")[0] for line in (out / "failed.tsv").read_text().splitlines()[1:]) == \
        ["R007", "R008"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # end to end: extract-image over the download folder
    rep3 = extract_image_features(str(ds), str(out), str(root / "full"), **QUIET)
    assert (rep3["found"], rep3["missing"], rep3["unreadable"]) == (7, 3, 0)
    feats = _read(ds / "Img.feat3CLS", n=10)
    assert set(np.flatnonzero(~feats.any(1))) == {7, 8, 9}
    with Image.open(out / "R003.jpg") as img:  # a PNG saved under the default extension
        assert np.allclose(feats[3], _direct(model, img), atol=1e-5)
    assert np.allclose(feats[3], _direct(model, _image(3)), atol=1e-5)
    assert np.allclose(feats[6], feats[0], atol=1e-6)  # the flaky URL served image 0


def test_download_writes_atomically(tmp_path, server, monkeypatch):
    out = tmp_path / "cache"
    out.mkdir()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(images_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        images_mod._fetch(f"{server.url}/img/0.png", str(out / "R000.png"), 0, 5, 0)
    assert os.listdir(out) == []  # neither a partial image nor a temporary file


def test_download_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"Img\.imageurl: missing"):
        download_images(str(_dataset(tmp_path)), str(tmp_path / "c"), **QUIET)
    with pytest.raises(PipelineError, match="dataset folder not found"):
        download_images(str(tmp_path / "nope"), str(tmp_path / "c"), **QUIET)
    ds = _dataset(tmp_path, name="Bad")
    (ds / "Bad.imageurl").write_text("item_id\turl\nR000\thttp://127.0.0.1:9/x.png\n")
    with pytest.raises(PipelineError, match="header"):
        download_images(str(ds), str(tmp_path / "c"), **QUIET)
    assert not (tmp_path / "c").exists()
