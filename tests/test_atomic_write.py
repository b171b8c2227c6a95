"""``recbole_mm.utils.atomic_write``: the one atomic-write helper (checkpoints, codes, reports,
feature files, result JSON): unique temporary names, the umask's permissions, nothing left behind."""

from __future__ import annotations

import json
import os
import threading

import pytest

from recbole_mm.trainer.checkpoint import remove_stale_temps
from recbole_mm.utils import atomic_write, write_json


def _temps(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n]


def test_bytes_text_and_writer(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "x\ny ±\n")
    atomic_write(tmp_path / "sub" / "c.bin", lambda f: f.write(b"abc"))  # the folder is created
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "x\ny ±\n".encode()
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"abc"
    write_json({"a": 1}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert not _temps(tmp_path)


def test_concurrent_writers_leave_one_complete_file_and_no_temp(tmp_path):
    path = tmp_path / "report.md"
    payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
    barrier = threading.Barrier(len(payloads))
    names = []

    def writer(data):
        def write(f):
            barrier.wait(timeout=10)  # every thread has its temporary file open at once
            names.extend(_temps(tmp_path))
            f.write(data)
        atomic_write(path, write)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(payloads)  # unique temporary names, all there at once
    assert all(n.startswith(".report.md.tmp-") for n in names)
    assert path.read_bytes() in payloads  # one writer's data, complete
    assert not _temps(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644)])
def test_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == mode


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert not _temps(tmp_path)


def test_temp_names_are_those_remove_stale_temps_cleans(tmp_path):
    """A temporary file left by a killed run (``.<run>.pth.tmp-<pid>-<random>``) is recognised."""
    seen = []

    def stop(f):
        seen.extend(_temps(tmp_path))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "run.pth", stop)
    stale = tmp_path / seen[0]
    stale.write_bytes(b"partial")  # as a SIGKILL would leave it
    assert remove_stale_temps(str(tmp_path / "run")) == [str(stale)]
