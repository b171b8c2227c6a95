"""Validating readers for the atomic files (checked once, at load).

Every failure raises :class:`DataValidationError` with one line naming the file (and the
line or row) and what was expected.  Readers only read: nothing is ever written.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pandas as pd

from recbole_mm.data.formats import INTER_HEADER, TEXT_HEADER  # the one definition of the header lines


class DataValidationError(ValueError):
    """An input file does not match the atomic format; the message names file and line."""


def _fail(path, where, msg):
    loc = f"{path}:{where}" if where is not None else f"{path}"
    raise DataValidationError(f"{loc}: {msg}")


BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 24


def check_utf8(path: str, stream=None) -> None:
    """Raise :class:`DataValidationError` ``path:line`` when the file (or the binary ``stream``,
    reported as ``path``) is not UTF-8 text; read in blocks cut at a newline, so a multi-byte
    character is never split.  A leading byte-order mark is allowed: every text reader strips
    it (:func:`open_text`)."""
    if stream is None:
        with open(path, "rb") as f:
            return check_utf8(path, f)
    lineno, rest = 1, b""
    while True:
        block = stream.read(_CHUNK)
        data = rest + block
        cut = len(data) if not block else data.rfind(b"\n") + 1
        piece, rest = data[:cut], data[cut:]
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as e:
            line_start = piece.rfind(b"\n", 0, e.start) + 1
            _fail(path, lineno + piece.count(b"\n", 0, e.start),
                  f"not UTF-8 text (byte 0x{piece[e.start]:02x} at column {e.start - line_start + 1}); "
                  "save the file as UTF-8")
        lineno += piece.count(b"\n")
        if not block:
            return


def open_text(path: str):
    """Open a UTF-8 text input file for reading: checked first (:func:`check_utf8`: one error naming
    the file and line of the first undecodable byte), a leading byte-order mark stripped.  Every
    text input (atomic files, histories, config files) is opened through here."""
    check_utf8(path)
    return open(path, encoding="utf-8-sig")


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        _fail(path, None, f"missing {what}")
    return path


def read_index_file(path: str) -> list[str]:
    """``.item2index`` / ``.user2index``: ``raw<TAB>index`` lines, no header, indices 0..n-1.

    Returns the raw ids in index order.
    """
    raw_by_index: dict[int, str] = {}
    seen_raw: dict[str, int] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                _fail(path, lineno, f"expected '<raw id>\\t<integer index>', got {line[:80]!r}")
            raw, idx = parts
            try:
                i = int(idx)
            except ValueError:
                _fail(path, lineno, f"index must be an integer, got {idx[:40]!r}")
            if i < 0:
                _fail(path, lineno, f"index must be >= 0, got {i}")
            if i in raw_by_index:
                _fail(path, lineno, f"index {i} is used twice (also for {raw_by_index[i]!r})")
            if raw in seen_raw:
                _fail(path, lineno, f"raw id {raw!r} listed twice")
            raw_by_index[i] = raw
            seen_raw[raw] = i
    n = len(raw_by_index)
    if n == 0:
        _fail(path, None, "is empty; expected one '<raw id>\\t<index>' line per entry")
    if max(raw_by_index) != n - 1:
        missing = next(i for i in range(n) if i not in raw_by_index)
        _fail(path, None, f"indices must be 0..{n - 1} without gaps; index {missing} is missing")
    return [raw_by_index[i] for i in range(n)]


def _read_header(path: str) -> list[str]:
    with open_text(path) as f:
        first = f.readline()
    if not first:
        _fail(path, 1, "file is empty; expected a header line")
    return first.rstrip("\n").rstrip("\r").split("\t")


def read_presplit_inter(
    path: str,
    item_vocab: dict[str, int] | None,
    user_vocab: dict[str, int] | None,
    max_len: int,
    one_row_per_user: bool = False,
) -> pd.DataFrame:
    """Read ``<d>.<split>.inter`` (``user_id:token item_id_list:token_seq item_id:token``).

    Tokens are mapped through ``item_vocab``/``user_vocab`` (token -> internal id) when given;
    an unknown token is an error naming its line; with ``one_row_per_user`` (valid / test) a user
    listed twice is one too (it would be counted twice).  Item lists keep their last ``max_len``
    items.  Returns a DataFrame with ``user_id``, ``item_id_list`` (arrays) and ``item_id``.
    """
    header = _read_header(path)
    if tuple(header) != INTER_HEADER:
        _fail(path, 1, f"header must be {'<TAB>'.join(INTER_HEADER)!r}, got {'<TAB>'.join(header)!r}")
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            header=0,
            names=["user_id", "item_id_list", "item_id"],
            dtype=str,
            encoding="utf-8-sig",  # checked by _read_header (open_text)
            keep_default_na=False,
            na_values=[],
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.ParserError as e:  # e.g. "Expected 3 fields in line 7, saw 4"
        msg = str(e).split("C error: ")[-1].strip()
        _fail(path, None, f"expected 3 tab-separated columns: {msg}")
    if len(df) == 0:
        _fail(path, None, "has a header but no rows")
    lines = np.arange(len(df)) + 2  # header is line 1
    nulls = df.isna().any(axis=1).to_numpy()
    if nulls.any():
        r = int(np.argmax(nulls))
        _fail(path, int(lines[r]), "expected 3 tab-separated columns (user, item list, item)")
    for col in ("user_id", "item_id"):
        empty = (df[col] == "").to_numpy()
        if empty.any():
            r = int(np.argmax(empty))
            _fail(path, int(lines[r]), f"empty {col} (expected 3 tab-separated columns: user, item list, item)")
    if one_row_per_user:
        twice = df["user_id"].duplicated().to_numpy()
        if twice.any():
            r = int(np.argmax(twice))
            first = int(np.argmax((df["user_id"] == df["user_id"].iloc[r]).to_numpy()))
            _fail(path, int(lines[r]), f"user {df['user_id'].iloc[r]!r} listed twice (also line {int(lines[first])}); "
                                       "an evaluation split holds one row per user")
    seqs = df["item_id_list"].str.split(" ")
    seqs = seqs.map(lambda s: [t for t in s if t])
    lengths = seqs.map(len).to_numpy()
    if (lengths == 0).any():
        r = int(np.argmax(lengths == 0))
        _fail(path, int(lines[r]), "empty item_id_list: every row needs at least one history item")

    flat = pd.Series(np.concatenate(seqs.to_numpy()) if len(seqs) else [], dtype=object)
    if item_vocab is not None:
        flat_ids = _map_tokens(path, flat, item_vocab, np.repeat(lines, lengths), "item_id_list", ".item2index")
        target = _map_tokens(path, df["item_id"], item_vocab, lines, "item_id", ".item2index")
    else:
        flat_ids, target = flat.to_numpy(), df["item_id"].to_numpy()
    if user_vocab is not None:
        users = _map_tokens(path, df["user_id"], user_vocab, lines, "user_id", ".user2index")
    else:
        users = df["user_id"].to_numpy()
    parts = np.split(flat_ids, np.cumsum(lengths)[:-1])
    if lengths.max() > max_len:
        parts = [p[-max_len:] for p in parts]
    out = pd.DataFrame({"user_id": users, "item_id": target})
    out.insert(1, "item_id_list", parts)
    return out


def _map_tokens(path, tokens: pd.Series, vocab: dict, lines, field: str, vocab_name: str) -> np.ndarray:
    ids = tokens.map(vocab)
    bad = ids.isna().to_numpy()
    if bad.any():
        r = int(np.argmax(bad))
        _fail(path, int(lines[r]), f"{field} token {tokens.iloc[r]!r} is not in {vocab_name}")
    return ids.to_numpy(dtype=np.int64)


def read_text(path: str, raw_ids: list[str]) -> list[str]:
    """``.text``: header ``item_id:token<TAB>text:token_seq``, rows keyed by raw item id.

    Returns the texts aligned with ``raw_ids``; every item must have a non-empty text.
    """
    header = _read_header(path)
    if tuple(header) != TEXT_HEADER:
        _fail(path, 1, f"header must be {'<TAB>'.join(TEXT_HEADER)!r}, got {'<TAB>'.join(header)!r}")
    texts: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as f:  # checked by _read_header (open_text)
        next(f)
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\n").rstrip("\r")
            raw, sep, text = line.partition("\t")
            if not sep or not raw:
                _fail(path, lineno, f"expected '<raw item id>\\t<text>', got {line[:80]!r}")
            texts[raw] = text.strip()
    out = []
    for raw in raw_ids:
        t = texts.get(raw)
        if not t:
            _fail(path, None, f"item {raw!r} (from .item2index) has no text; every item needs one")
        out.append(t)
    return out


def _odd(a: np.ndarray) -> float:
    """Share of values no feature extractor writes (|x| > 1e8, or 0 < |x| < 1e-30)."""
    a = np.abs(a[np.isfinite(a)])
    return float(((a > 1e8) | ((a > 0) & (a < 1e-30))).mean()) if a.size else 1.0


def _float64_hint(n_floats: int, n_items: int, dim: int | None) -> str:
    if dim and n_floats == 2 * n_items * dim:
        return f" (twice {n_items} x {dim}: float64 data? float32 expected)"
    return ""


def check_feature_values(path: str, rows: np.ndarray) -> None:
    """Refuse a feature table that cannot be right, from ``rows`` (its first rows, float32 as read):
    float64 data read as float32 (half of the values are the low words of doubles: absurd
    magnitudes, while the same bytes read as float64 are ordinary numbers)."""
    flat = rows.reshape(-1)[: rows.size - rows.size % 2]
    if flat.size and _odd(flat) > 0.05 and _odd(flat.view("<f8")) < 0.01:
        _fail(path, None, "holds float64 values (read as float32, half of them are absurd: |x| > 1e8 or < 1e-30); "
                          "features must be little-endian float32 (numpy: arr.astype('<f4').tofile(path))")


def _all_zero(path: str) -> None:
    _fail(path, None, "every value is 0: no item has this modality (a failed extraction?); "
                      "remove the file's suffix from the config or extract the features again")


def _float_count(path: str, n_items: int, dim: int | None) -> tuple[int, int]:
    """``(floats in the file, dim)`` of a ``.featNCLS`` file; ``dim`` None: inferred (one row per item)."""
    size = os.path.getsize(path)
    if size == 0 or size % 4:
        _fail(path, None, f"size {size} bytes is not a positive multiple of 4 (float32 rows expected)")
    n_floats = size // 4
    if dim is None:
        if n_items == 0 or n_floats % n_items:
            _fail(path, None, f"{n_floats} floats cannot be {n_items} rows (one per item in .item2index)")
        dim = n_floats // n_items
    return n_floats, dim


def read_features(path: str, raw_ids: list[str], dim: int | None) -> np.ndarray:
    """``.featNCLS``: raw little-endian float32, ``n_items x dim``, row i = item index i."""
    n_items = len(raw_ids)
    n_floats, dim = _float_count(path, n_items, dim)
    size = 4 * n_floats
    if n_floats % dim:
        _fail(path, None, f"size {size} bytes is not a multiple of 4*dim = {4 * dim}")
    rows = n_floats // dim
    if rows != n_items:
        _fail(path, None, f"has {rows} rows of dim {dim}, expected {n_items} (one per item in .item2index)"
                          + _float64_hint(n_floats, n_items, dim))
    arr = np.fromfile(path, dtype="<f4").reshape(n_items, dim)
    check_feature_values(path, arr[:4096])
    if not arr.any():
        _all_zero(path)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        r = int(np.argmin(finite))
        _fail(path, f"row {r}", f"item {raw_ids[r]!r} has NaN or Inf values")
    return arr.astype(np.float32, copy=False)


def read_feature_table(path: str, raw_ids: list[str], dim: int | None, what: str = "features",
                       chunk_rows: int = 65536):
    """``.featNCLS`` read straight into a ``torch.float32 [n_items + 1, dim]`` table, row 0 zeros
    (padding), row i + 1 = item index i: the layout of ``dataset.features``.

    The same checks as :func:`read_features`, but the file is read once into the table and
    checked for NaN/Inf in blocks of ``chunk_rows``, so a large catalogue needs one copy of its
    features in memory (no numpy array next to the table).  ``what`` names the expected
    feature size in the error (e.g. ``"plm_size"``); ``dim`` None: inferred from the file's size.
    """
    import sys

    import torch

    n_items = len(raw_ids)
    n_floats, dim = _float_count(path, n_items, dim)
    size = 4 * n_floats
    hint = _float64_hint(n_floats, n_items, dim)
    if n_floats % n_items == 0 and n_floats // n_items != dim:
        _fail(path, None, f"has {n_items} rows of dim {n_floats // n_items}; expected dim {dim} ({what}){hint}")
    if n_floats != n_items * dim:
        _fail(path, None, f"has {n_floats} floats, expected {n_items} rows (one per item in .item2index) of dim {dim} ({what}){hint}")
    table = torch.zeros(n_items + 1, dim, dtype=torch.float32)
    body = table.numpy()[1:]
    if sys.byteorder == "little":
        with open(path, "rb") as f:
            if f.readinto(memoryview(body).cast("B")) != size:
                _fail(path, None, "could not be read completely")
    else:  # pragma: no cover - big-endian hosts
        body[:] = np.fromfile(path, dtype="<f4").reshape(n_items, dim)
    check_feature_values(path, body[:4096])
    nonzero = False
    for start in range(0, n_items, chunk_rows):
        block = table[1 + start : 1 + start + chunk_rows]
        finite = torch.isfinite(block).all(dim=1)
        if not bool(finite.all()):
            r = start + int(torch.nonzero(~finite)[0])
            _fail(path, f"row {r}", f"item {raw_ids[r]!r} has NaN or Inf values")
        nonzero = nonzero or bool(block.any())
    if not nonzero:
        _all_zero(path)
    return table


def read_attributes(path: str, raw_ids: list[str]) -> tuple[list[str], list[dict[str, str] | None]]:
    """``.attr``: optional per-item attributes (Recformer / Reo-LM item "sentences").

    Header ``item_id:token<TAB><key>:token_seq<TAB>...`` (one column per attribute, in
    sentence order, e.g. ``title``, ``brand``, ``category``); rows keyed by raw item id, an
    empty cell = attribute missing.  Returns ``(keys, rows)`` with ``rows`` aligned with
    ``raw_ids``: a ``{key: value}`` dict of the non-empty cells, or ``None`` for an item the
    file does not list (the model then falls back to the item's ``.text``).
    """
    header = _read_header(path)
    if len(header) < 2 or header[0] != "item_id:token":
        _fail(path, 1, f"header must be 'item_id:token<TAB><key>:token_seq...', got {'<TAB>'.join(header)!r}")
    keys = []
    for col in header[1:]:
        key = col.split(":", 1)[0].strip()
        if not key or key in keys:
            _fail(path, 1, f"attribute column {col!r} is empty or repeated")
        keys.append(key)
    wanted = {raw: i for i, raw in enumerate(raw_ids)}
    rows: list[dict[str, str] | None] = [None] * len(raw_ids)
    with open(path, encoding="utf-8-sig") as f:  # checked by _read_header (open_text)
        next(f)
        for lineno, line in enumerate(f, 2):
            cells = line.rstrip("\n").rstrip("\r").split("\t")
            if len(cells) != len(header):
                _fail(path, lineno, f"expected {len(header)} tab-separated columns, got {len(cells)}")
            i = wanted.get(cells[0])
            if i is None:
                _fail(path, lineno, f"item {cells[0]!r} is not in .item2index")
            rows[i] = {k: v.strip() for k, v in zip(keys, cells[1:]) if v.strip()}
    return keys, rows
