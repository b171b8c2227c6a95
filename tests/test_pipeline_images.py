"""Image features (tiny random CLIP saved to a local folder) and image download (local HTTP server)."""

import http.server
import io
import os
import threading

import numpy as np
import pytest
import torch

from recbole_mm.cli import main as cli_main
from recbole_mm.pipeline.common import PipelineError
from recbole_mm.pipeline.images import download_images, extract_image_features, preprocess_image

PIL = pytest.importorskip("PIL", reason="pillow (the extract extra) is not installed")
from PIL import Image  # noqa: E402

transformers = pytest.importorskip("transformers", reason="transformers (the extract extra) is not installed")

N_ITEMS = 12


def _dataset(root, name="Img", n=N_ITEMS):
    folder = root / name
    folder.mkdir(parents=True)
    with open(folder / f"{name}.item2index", "w") as f:
        for i in range(n):
            f.write(f"R{i:03d}\t{i}\n")
    return folder


def _image(i):
    rng = np.random.default_rng(i)
    size = (24 + 7 * i, 40 - i)  # non-square, different sizes
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(["RGB", "RGBA", "L"][i % 3])  # colour, alpha, grayscale


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    root = tmp_path_factory.mktemp("clip")
    full = CLIPModel(cfg).eval()
    full.save_pretrained(root / "full")
    vision = CLIPVisionModelWithProjection(cfg.vision_config)
    vision.config.projection_dim = 16
    vision.vision_model.load_state_dict(full.vision_model.state_dict())
    vision.visual_projection = torch.nn.Linear(32, 16, bias=False)
    vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
    vision.save_pretrained(root / "vision")
    return root, full


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_ITEMS):
        if i in (4, 9):
            continue  # missing
        img = _image(i)
        if i == 6:
            (folder / f"R{i:03d}.jpg").write_bytes(b"not an image at all")  # unreadable
        elif i == 2:
            img.save(folder / f"{i}.png")  # keyed by item index
        else:
            img.save(folder / f"R{i:03d}.png")
    return folder


def _direct(model, img):
    x = torch.from_numpy(preprocess_image(img, 32)[None])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x)
    return getattr(out, "pooler_output", out)[0].numpy()


def test_extract_image_rows_align_with_items(tmp_path, clip_dirs, images):
    root, model = clip_dirs
    ds = _dataset(tmp_path)
    msgs = []
    rep = extract_image_features(str(ds), str(images), str(root / "full"), batch_size=4, log=msgs.append)
    assert rep["n_items"] == N_ITEMS and rep["dim"] == 16
    assert (rep["found"], rep["missing"], rep["unreadable"]) == (9, 2, 1)
    assert any("R004" in m and "R009" in m for m in msgs) and any("R006.jpg" in m for m in msgs)
    feats = np.fromfile(ds / "Img.feat3CLS", dtype="<f4").reshape(N_ITEMS, 16)
    assert os.path.getsize(ds / "Img.feat3CLS") == N_ITEMS * 16 * 4
    zero = np.abs(feats).sum(1) == 0
    assert set(np.flatnonzero(zero)) == {4, 6, 9}
    assert np.isfinite(feats).all()
    for i in (0, 1, 2, 11):  # RGB, RGBA, by-index PNG, grayscale
        img = Image.open(images / (f"{i}.png" if i == 2 else f"R{i:03d}.png"))
        assert np.allclose(feats[i], _direct(model, img), atol=1e-5)
    assert not np.allclose(feats[0], feats[1])
    with pytest.raises(PipelineError, match="already exists"):
        extract_image_features(str(ds), str(images), str(root / "full"), log=lambda m: None)
    # the vision-only model with the same weights gives the same rows
    extract_image_features(str(ds), str(images), str(root / "vision"), suffix="featV", log=lambda m: None)
    assert np.allclose(np.fromfile(ds / "Img.featV", dtype="<f4").reshape(N_ITEMS, 16), feats, atol=1e-5)


def test_extract_image_cli_and_errors(tmp_path, clip_dirs, images, capsys):
    root, _ = clip_dirs
    ds = _dataset(tmp_path)
    assert cli_main(["extract-image", "--dataset", str(ds), "--images", str(images), "--encoder", str(root / "full")]) == 0
    assert "9 images encoded, 2 missing, 1 unreadable" in capsys.readouterr().out
    assert cli_main(["extract-image", "--dataset", str(ds), "--images", str(images), "--encoder",
                     str(tmp_path / "nope"), "--overwrite"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert cli_main(["extract-image", "--dataset", str(ds), "--images", str(images), "--overwrite"]) == 2
    assert "no package ships CLIP weights" in capsys.readouterr().err
    assert cli_main(["extract-image", "--dataset", str(ds), "--images", str(tmp_path / "noimg"),
                     "--encoder", str(root / "full"), "--overwrite"]) == 2
    assert "images folder not found" in capsys.readouterr().err


def test_open_clip_backend_is_optional(tmp_path, images):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed")
    ds = _dataset(tmp_path)
    with pytest.raises(PipelineError, match="open_clip is not installed"):
        extract_image_features(str(ds), str(images), "ViT-B-32:/x.bin", backend="open_clip", log=lambda m: None)


class _Server:
    """Local HTTP server: /img/<i>.png images, /missing.png -> 404, /flaky.png -> 500 then 200."""

    def __init__(self):
        self.requests: list[str] = []
        self.flaky_hits = 0
        png = {}
        for i in range(5):
            buf = io.BytesIO()
            _image(i).convert("RGB").save(buf, format="PNG")
            png[f"/img/{i}.png"] = buf.getvalue()
        png["/flaky.png"] = png["/img/0.png"]
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if self.path == "/flaky.png":
                    outer.flaky_hits += 1
                    if outer.flaky_hits == 1:
                        self.send_response(500)
                        self.end_headers()
                        return
                body = png.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_download_images_with_retries_cache_and_extraction(tmp_path, clip_dirs):
    root, model = clip_dirs
    server = _Server()
    try:
        ds = _dataset(tmp_path, n=8)
        with open(ds / "Img.imageurl", "w") as f:
            f.write("item_id:token\turl:token\n")
            for i in range(5):
                f.write(f"R{i:03d}\t{server.url}/img/{i}.png\n")
            f.write(f"R005\t{server.url}/missing.png\n")
            f.write(f"R006\t{server.url}/flaky.png\n")
        out = tmp_path / "cache"
        rep = download_images(str(ds), str(out), retries=2, workers=3, backoff=0.01, log=lambda m: None)
        assert rep == {"total": 7, "cached": 0, "downloaded": 6, "failed": 1}
        assert server.flaky_hits == 2  # failed once, retried
        assert (out / "failed.tsv").read_text().startswith(f"R005\t{server.url}/missing.png\tHTTP 404")
        assert server.requests.count("/missing.png") == 1  # a 404 is not retried
        assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == [f"R00{i}.png" for i in (0, 1, 2, 3, 4, 6)]
        n_requests = len(server.requests)
        rep2 = download_images(str(ds), str(out), retries=0, backoff=0.01, log=lambda m: None)
        assert rep2["cached"] == 6 and rep2["downloaded"] == 0 and rep2["failed"] == 1
        assert server.requests[n_requests:] == ["/missing.png"]  # cached files are not fetched again
        assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
        rep3 = extract_image_features(str(ds), str(out), str(root / "full"), log=lambda m: None)
        assert (rep3["found"], rep3["missing"]) == (6, 2)
        feats = np.fromfile(ds / "Img.feat3CLS", dtype="<f4").reshape(8, 16)
        assert np.allclose(feats[3], _direct(model, _image(3).convert("RGB")), atol=1e-5)
        assert np.allclose(feats[6], feats[0])  # the flaky URL served image 0
    finally:
        server.close()
    with pytest.raises(PipelineError, match="imageurl: missing"):
        download_images(str(_dataset(tmp_path, name="NoUrl")), str(tmp_path / "c2"), log=lambda m: None)
