"""``recbole-mm prepare``: download from a local HTTP server on 127.0.0.1 (resumed after a dropped
connection), preprocess, text features; and the walls a newcomer met on the way."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import threading

import numpy as np
import pytest

from recbole_mm.categories import prepare_hint, resolve
from recbole_mm.cli import main


def _gz(lines: list[dict]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines).encode())
    return buf.getvalue()


def raw_category(n_users=60, n_items=24, min_len=6, max_len=10, seed=0, short_users=0):
    """Amazon Reviews 2023 layout: ``(reviews .jsonl.gz bytes, meta .jsonl.gz bytes)``."""
    rng = np.random.default_rng(seed)
    reviews = []
    for u in range(n_users + short_users):
        n = int(rng.integers(min_len, max_len + 1)) if u < n_users else 2
        start = int(rng.integers(n_items))
        for t in range(n):
            reviews.append({"rating": 5.0, "user_id": f"U{u:04d}", "parent_asin": f"P{(start + t) % n_items:04d}",
                            "timestamp": 1600000000000 + 1000 * t})
    meta = [{"parent_asin": f"P{i:04d}", "title": f"Paint brush set number {i}", "store": f"Brand{i % 4}",
             "categories": ["Arts, Crafts & Sewing", f"Painting {i % 3}"], "images": []} for i in range(n_items)]
    return _gz(reviews), _gz(meta)


class Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 with HTTP Range; a path in ``drop`` has its
    first response cut after half of its body (the connection closes)."""

    def __init__(self, files: dict[str, bytes], drop=()):
        self.files, self.drop, self.requests = files, set(drop), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start, status = int(rng.split("=")[1].split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Connection", "close")
                self.end_headers()
                if self.path in outer.drop:
                    outer.drop.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the dropped connection
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/amazon"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    reviews, meta = raw_category()
    cat = resolve("Arts")[0]
    srv = Server({f"/amazon/review_categories/{cat}.jsonl.gz": reviews,
                  f"/amazon/meta_categories/meta_{cat}.jsonl.gz": meta},
                 drop={f"/amazon/review_categories/{cat}.jsonl.gz"})
    yield srv
    srv.close()


def test_prepare_downloads_resumes_a_dropped_connection_and_makes_a_dataset(server, workdir, capsys):
    code = main(["prepare", "Arts", "--download", "--input", "raw", "--base-url", server.url, "--output", "out",
                 "--retries", "2"])
    assert code == 0, capsys.readouterr().err
    cat = resolve("Arts")[0]
    for path, data in server.files.items():
        assert (workdir / "raw" / os.path.basename(path)).read_bytes() == data
    reviews = f"/amazon/review_categories/{cat}.jsonl.gz"
    ranges = [r for p, r in server.requests if p == reviews]
    half = len(server.files[reviews]) // 2
    assert ranges == [None, f"bytes={half}-"]  # the second request resumed where the first was cut
    assert not list((workdir / "raw").glob("*.part"))
    folder = workdir / "out" / "Arts"
    n_items = sum(1 for _ in open(folder / "Arts.item2index"))
    assert os.path.getsize(folder / "Arts.feat1CLS") == n_items * 384 * 4  # default MiniLM text encoder
    # ready for a model: the image models run text-only on it
    from recbole_mm.data import create_dataset
    from recbole_mm.quick_start import build_config

    ds = create_dataset(build_config("MISSRec", "Arts", config_dict={"data_path": str(workdir / "out"), "use_gpu": False}))
    assert ds.features["text"].shape == (n_items + 1, 384) and not ds.feature_presence["image"].any()
    # files already there are not downloaded again
    from recbole_mm.pipeline.prepare import download

    n = len(server.requests)
    assert download(server.url + reviews[len("/amazon"):], str(workdir / "raw" / f"{cat}.jsonl.gz")) and len(server.requests) == n


def test_download_resumes_a_part_left_by_an_earlier_run(server, workdir):
    from recbole_mm.pipeline.prepare import category_urls, download

    url, data = next((u, server.files[u.split(server.url[: -len("/amazon")])[1]])
                     for u in category_urls(resolve("Arts")[0], server.url).values() if "meta_" in u)
    (workdir / "m.gz.part").write_bytes(data[:100])
    download(url, str(workdir / "m.gz"), log=lambda *_: None)
    assert (workdir / "m.gz").read_bytes() == data
    assert server.requests[-1][1] == "bytes=100-"


def test_download_refuses_a_file_that_fails_its_checksum(workdir, capsys):
    reviews, meta = raw_category()
    cat = resolve("Arts")[0]
    srv = Server({f"/amazon/review_categories/{cat}.jsonl.gz": reviews[:-12] + b"\0" * 12,  # CRC/length trailer wrong
                  f"/amazon/meta_categories/meta_{cat}.jsonl.gz": meta})
    try:
        code = main(["prepare", "Arts", "--download", "--input", "raw", "--base-url", srv.url, "--output", "out"])
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert code == 2 and "gzip checksum" in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "raw" / f"{cat}.jsonl.gz").exists() and not (workdir / "out").exists()


def test_download_of_an_unknown_category_is_one_line(server, workdir, capsys):
    code = main(["prepare", "NoSuchCategory", "--download", "--input", "raw", "--base-url", server.url])
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 404" in err and "NoSuchCategory" in err and len(err.strip().splitlines()) == 1


def test_prepare_reads_files_named_after_the_alias_or_the_category(workdir):
    reviews, meta = raw_category()
    for stem in ("Arts", resolve("Arts")[0]):
        raw = workdir / f"raw-{len(stem)}"
        raw.mkdir()
        (raw / f"{stem}.jsonl.gz").write_bytes(reviews)
        (raw / f"meta_{stem}.jsonl.gz").write_bytes(meta)
        assert main(["prepare", "Arts", "--input", str(raw), "--output", str(workdir / f"o{len(stem)}")]) == 0


def test_prepare_with_images_needs_a_clip_folder_before_any_work(workdir, capsys):
    code = main(["prepare", "Arts", "--input", "raw", "--images", "imgs"])
    assert code == 2 and "--clip" in capsys.readouterr().err and not (workdir / "dataset").exists()


# -- walls -------------------------------------------------------------------------------------


def test_kcore_that_removes_most_users_warns_with_counts_and_the_flag(workdir, capsys):
    core = [{"user_id": f"C{u}", "parent_asin": f"P{i:04d}", "timestamp": 1000 * i} for u in range(10) for i in range(6)]
    short = [{"user_id": f"S{u}", "parent_asin": f"P{6 + (u + t) % 18:04d}", "timestamp": 1000 * t}
             for u in range(40) for t in range(2)]
    _, meta = raw_category()
    (workdir / "raw").mkdir()
    (workdir / "raw" / "Small.jsonl.gz").write_bytes(_gz(core + short))
    (workdir / "raw" / "meta_Small.jsonl.gz").write_bytes(meta)
    assert main(["preprocess", "--input", "raw", "--category", "Small", "--output", "out"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:"))
    assert "kept 10 of 50 users, 6 of 24 items" in line and "--kcore 3" in line


def test_kcore_keeping_most_users_does_not_warn(workdir, capsys):
    reviews, meta = raw_category()
    (workdir / "raw").mkdir()
    (workdir / "raw" / "Fine.jsonl.gz").write_bytes(reviews)
    (workdir / "raw" / "meta_Fine.jsonl.gz").write_bytes(meta)
    assert main(["preprocess", "--input", "raw", "--category", "Fine", "--output", "out"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_missing_dataset_names_the_one_command_that_makes_it(workdir, capsys):
    code = main(["finetune", "-m", "UniSRec", "-d", "Arts"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert prepare_hint("Arts", "dataset/downstream/") in err
    assert "recbole-mm prepare Arts --download --input raw/Arts_Crafts_and_Sewing" in err
    code = main(["pretrain", "-m", "UniSRec", "-d", "Games,Office"])
    assert code == 2 and "recbole-mm prepare Games --download --input raw/Video_Games --output dataset/pretrain" in capsys.readouterr().err


def test_id_model_with_mode_says_it_has_one_mode(workdir, capsys):
    code = main(["finetune", "-m", "SASRec", "-d", "demo", "--mode", "inductive"])
    err = capsys.readouterr().err
    assert code == 2 and "one mode" in err and "--mode can be dropped" in err and len(err.strip().splitlines()) == 1
