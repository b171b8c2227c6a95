"""``recbole-mm preprocess``: raw Amazon review files -> pre-split atomic files.

Input formats
-------------
* ``amazon2023`` (Amazon Reviews 2023): ``<Cat>.jsonl[.gz]`` (``user_id``, ``parent_asin``,
  ``timestamp``, ...) and ``meta_<Cat>.jsonl[.gz]`` (``parent_asin``, ``title``,
  ``categories``, ``store``, ``images``).  Items are ``parent_asin`` (as in the 2023 benchmarks).
* ``amazon2018`` (Amazon 2018, also reads the 2014 layout): ``<Cat>.json[.gz]``
  (``reviewerID``, ``asin``, ``unixReviewTime``) and ``meta_<Cat>.json[.gz]`` (``asin``,
  ``title``, ``category`` or 2014's ``categories``, ``brand``, ``imageURLHighRes`` /
  ``imageURL`` / ``imUrl``).  Lines that are Python dict literals (2014 files) are accepted.

Processing (the UniSRec/MISSRec reference pipeline, made deterministic)
-------------------------------------------------------------------------
1. Reviews are streamed line by line (only three integer columns are kept in memory);
   malformed lines are counted with their line numbers, ``--max-bad-lines`` turns them
   into an error.
2. Items without a metadata record, or whose metadata gives no text, are removed.
3. Each user's interactions are sorted by time (ties keep file order); repeated
   (user, item) pairs keep the first occurrence (``--dedup first``), the last, or all.
4. Iterative k-core filtering (``--kcore``, default 5) on users and items; users with
   fewer than 3 interactions (possible only for ``--kcore`` < 3) are dropped, since
   leave-one-out needs a train, a valid and a test item.
5. Users are indexed in sorted raw-id order, items in order of first appearance along
   those users' sequences; leave-one-out split: ``train`` holds every prefix -> next pair
   of ``S[:-2]`` (longest prefix first), ``valid`` predicts ``S[-2]``, ``test`` ``S[-1]``;
   every list is cut to its last ``--max-len`` (50) items.
6. ``.text`` = title + categories + brand/store, each cleaned (HTML unescaped and
   stripped, quotes and line breaks removed, whitespace collapsed, trailing dots collapsed
   to one ``.``, a field of ``--max-field-chars`` or more dropped), joined by spaces;
   ``.attr`` = the same three cleaned fields in separate columns (``title``, ``brand``,
   ``category``; no trailing dot): the key-value item sentences of Recformer / Reo-LM.

Output: ``OUT_DIR/<name>/<name>.{train,valid,test}.inter``, ``.item2index``,
``.user2index``, ``.text``, ``.attr``, ``.imageurl`` (when the metadata has image URLs) and
``.stats.json``; the folder appears only when everything has been written.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import os
import re
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from recbole_mm.data import formats
from recbole_mm.data.formats import header_line
from recbole_mm.data.readers import BOM
from recbole_mm.pipeline.common import PipelineError, progress, staged_folder

# header lines of the files written (data/formats.py)
INTER_HEADER, TEXT_HEADER, URL_HEADER, ATTR_HEADER = (header_line(h) + "\n" for h in (
    formats.INTER_HEADER, formats.TEXT_HEADER, formats.URL_HEADER, formats.ATTR_HEADER))


@dataclass(frozen=True)
class RawFormat:
    reviews: str  # file stem, {cat} replaced
    meta: str
    user: tuple[str, ...]
    item: tuple[str, ...]
    time: tuple[str, ...]
    meta_item: tuple[str, ...]
    title: tuple[str, ...]
    categories: tuple[str, ...]
    brand: tuple[str, ...]
    exts: tuple[str, ...]


FORMATS = {
    "amazon2023": RawFormat(
        reviews="{cat}", meta="meta_{cat}", user=("user_id",), item=("parent_asin", "asin"),
        time=("timestamp",), meta_item=("parent_asin", "asin"), title=("title",),
        categories=("categories",), brand=("store", "brand"), exts=(".jsonl", ".jsonl.gz", ".json", ".json.gz"),
    ),
    "amazon2018": RawFormat(
        reviews="{cat}", meta="meta_{cat}", user=("reviewerID",), item=("asin",),
        time=("unixReviewTime",), meta_item=("asin",), title=("title",),
        categories=("category", "categories"), brand=("brand",), exts=(".json", ".json.gz", ".jsonl", ".jsonl.gz"),
    ),
}


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def find_file(input_dir: str, stem: str, exts) -> str:
    tried = []
    for ext in exts:
        path = os.path.join(input_dir, stem + ext)
        if os.path.isfile(path):
            return path
        tried.append(os.path.basename(path))
    raise PipelineError(f"{input_dir}: none of {', '.join(tried)} found")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path: str, desc: str):
    """``(lineno, text)`` of a raw file (plain or ``.gz``): UTF-8 (a byte-order mark stripped), an
    undecodable line or a truncated / fake ``.gz`` is a :class:`PipelineError` naming the file."""
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(progress(f, desc=desc, unit=" lines"), 1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PipelineError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1}); save the file as UTF-8") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PipelineError(f"{path}: not a complete gzip file after line {lineno} "
                            f"({type(e).__name__}: {' '.join(str(e).split())}); download it again") from None


class BadLines:
    """Counts malformed lines of one file; too many is an error naming the first ones."""

    def __init__(self, path: str, limit: int):
        self.path, self.limit, self.count, self.first = path, limit, 0, []

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"line {lineno}: {why}")
        if self.count > self.limit:
            raise PipelineError(
                f"{self.path}: more than {self.limit} malformed lines ({'; '.join(self.first)}); "
                "fix the file or raise --max-bad-lines"
            )

    def report(self) -> str | None:
        if not self.count:
            return None
        return f"{self.path}: skipped {self.count} malformed line(s) ({'; '.join(self.first)})"


def iter_records(path: str, bad: BadLines, desc: str):
    """``(lineno, dict)`` for each parsable line; JSON, or a Python dict literal (2014 files)."""
    for lineno, line in _lines(path, desc):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            try:
                rec = ast.literal_eval(line) if line.startswith("{") else None
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                rec = None
            if rec is None:
                bad.add(lineno, f"not JSON ({e.msg} at column {e.colno})")
                continue
        if not isinstance(rec, dict):
            bad.add(lineno, f"expected a JSON object, got {type(rec).__name__}")
            continue
        yield lineno, rec


def _first(rec: dict, keys) -> object:
    for k in keys:
        v = rec.get(k)
        if v not in (None, ""):
            return v
    return None


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------
_TAG = re.compile(r"<[^>]+>")


def _flatten(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out += _flatten(v)
        return out
    if isinstance(value, dict):
        return []
    return [str(value)]


def clean_text(value, max_chars: int = 2000) -> str:
    """One metadata field as clean text ('' when empty or too long); see the module docstring."""
    parts = []
    for p in _flatten(value):
        if p not in parts:  # 2014 category lists repeat the top levels
            parts.append(p)
    text = html.unescape(" ".join(parts))
    text = _TAG.sub(" ", text)
    text = text.replace('"', "")
    text = " ".join(text.split())  # line breaks, tabs, runs of spaces
    text = text.rstrip(". ")
    if not text:
        return ""
    text += "."
    return "" if len(text) >= max_chars else text


def item_fields(rec: dict, fmt: RawFormat, max_chars: int) -> tuple[str, str, str]:
    """Cleaned ``(title, categories, brand)`` of a metadata record ('' when absent)."""
    fields = (_first(rec, fmt.title), _first(rec, fmt.categories), _first(rec, fmt.brand))
    return tuple(clean_text(f, max_chars) for f in fields)


def item_text(rec: dict, fmt: RawFormat, max_chars: int) -> str:
    return " ".join(t for t in item_fields(rec, fmt, max_chars) if t)


def image_url(rec: dict) -> str | None:
    """The main image URL of a metadata record (2023 ``images`` dicts, 2018/2014 URL lists)."""
    images = rec.get("images")
    if isinstance(images, list) and images and isinstance(images[0], dict):
        main = [im for im in images if im.get("variant") == "MAIN"] or images
        for key in ("large", "hi_res", "thumb"):
            for im in main:
                if im.get(key):
                    return str(im[key])
    for key in ("imageURLHighRes", "imageURL", "imUrl"):
        v = rec.get(key)
        if isinstance(v, list) and v:
            return str(v[0])
        if isinstance(v, str) and v:
            return v
    return None


# ---------------------------------------------------------------------------------------
# processing
# ---------------------------------------------------------------------------------------
@dataclass
class Interactions:
    users: list = field(default_factory=list)  # raw ids by user code
    items: list = field(default_factory=list)  # raw ids by item code
    u: array = field(default_factory=lambda: array("q"))
    i: array = field(default_factory=lambda: array("q"))
    t: array = field(default_factory=lambda: array("d"))


def read_reviews(path: str, fmt: RawFormat, bad: BadLines) -> Interactions:
    inter = Interactions()
    ucode: dict[str, int] = {}
    icode: dict[str, int] = {}
    for lineno, rec in iter_records(path, bad, "reviews"):
        user, item, ts = _first(rec, fmt.user), _first(rec, fmt.item), _first(rec, fmt.time)
        if user is None or item is None or ts is None:
            missing = [n for n, v in (("user", user), ("item", item), ("time", ts)) if v is None]
            bad.add(lineno, f"missing {'/'.join(missing)} field ({fmt.user[0]}, {fmt.item[0]}, {fmt.time[0]})")
            continue
        try:
            ts = float(ts)
        except (TypeError, ValueError):
            bad.add(lineno, f"time {ts!r} is not a number")
            continue
        user, item = str(user), str(item)
        uc = ucode.get(user)
        if uc is None:
            uc = ucode[user] = len(inter.users)
            inter.users.append(user)
        ic = icode.get(item)
        if ic is None:
            ic = icode[item] = len(inter.items)
            inter.items.append(item)
        inter.u.append(uc)
        inter.i.append(ic)
        inter.t.append(ts)
    return inter


def read_meta(path: str, fmt: RawFormat, wanted: dict[str, int], bad: BadLines, max_chars: int, attrs=None):
    """Texts and image URLs of the reviewed items (only those are kept in memory); ``attrs``
    (a dict), when given, receives each kept item's cleaned ``(title, brand, category)``."""
    texts: dict[int, str] = {}
    urls: dict[int, str] = {}
    no_text = 0
    for lineno, rec in iter_records(path, bad, "metadata"):
        key = _first(rec, fmt.meta_item)
        if key is None:
            bad.add(lineno, f"missing item field ({'/'.join(fmt.meta_item)})")
            continue
        code = wanted.get(str(key))
        if code is None or code in texts:
            continue  # not reviewed, or a duplicate record (the first one wins)
        title, categories, brand = item_fields(rec, fmt, max_chars)
        text = " ".join(t for t in (title, categories, brand) if t)
        if not text:
            no_text += 1
            continue
        texts[code] = text
        if attrs is not None:
            attrs[code] = tuple(v[:-1] if v.endswith(".") else v for v in (title, brand, categories))
        url = image_url(rec)
        if url:
            urls[code] = url
    return texts, urls, no_text


def kcore(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions surviving iterative user/item k-core filtering."""
    keep = np.ones(len(u), dtype=bool)
    if k <= 1:
        return keep
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
        ic = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _fmt(n) -> str:
    return f"{n:,}"


def build_sequences(inter: Interactions, texts: dict, kcore_k: int, dedup: str, stats: dict):
    """Filtered per-user chronological item sequences (user code -> item codes)."""
    u = np.frombuffer(inter.u, dtype=np.int64)
    i = np.frombuffer(inter.i, dtype=np.int64)
    t = np.frombuffer(inter.t, dtype=np.float64)
    stats["reviews"] = len(u)

    has_meta = np.zeros(len(inter.items), dtype=bool)
    has_meta[list(texts)] = True
    keep = has_meta[i]
    stats["items_without_metadata_or_text"] = int((~has_meta).sum())
    if not keep.any():
        raise PipelineError("no interactions left after removing items without metadata/text "
                            f"({_fmt(len(inter.items))} reviewed items, none found in the metadata with a title, "
                            "categories or brand)")
    u, i, t = u[keep], i[keep], t[keep]

    order = np.lexsort((np.arange(len(u)), t, u))  # by user, then time, then file order
    u, i, t = u[order], i[order], t[order]
    if dedup != "none":
        pair = u * (len(inter.items) + 1) + i
        if dedup == "first":
            _, first = np.unique(pair, return_index=True)
            sel = np.sort(first)
        else:  # last
            _, last_rev = np.unique(pair[::-1], return_index=True)
            sel = np.sort(len(pair) - 1 - last_rev)
        stats["duplicates_removed"] = int(len(u) - len(sel))
        u, i, t = u[sel], i[sel], t[sel]

    keep = kcore(u, i, kcore_k)
    if not keep.any():
        raise PipelineError(
            f"no interactions left after the {kcore_k}-core filter ({_fmt(len(u))} interactions of "
            f"{_fmt(len(np.unique(u)))} users / {_fmt(len(np.unique(i)))} items before it); try a smaller --kcore"
        )
    before = (len(np.unique(u)), len(np.unique(i)))
    u, i = u[keep], i[keep]
    counts = np.bincount(u)
    short = counts[u] < 3
    stats["users_shorter_than_3"] = int(len(np.unique(u[short])))
    u, i = u[~short], i[~short]
    stats["kept_by_filters"] = {"users": [len(np.unique(u)), before[0]], "items": [len(np.unique(i)), before[1]]}
    if not len(u):
        raise PipelineError("no users left with at least 3 interactions (needed for leave-one-out); "
                            "try a larger dataset or --kcore 3")
    # sequences: u is sorted, so split at user boundaries
    bounds = np.flatnonzero(np.diff(u)) + 1
    users = u[np.r_[0, bounds]]
    seqs = np.split(i, bounds)
    return users, seqs


def _mostly_removed(stats: dict) -> str | None:
    """The warning when the k-core (and leave-one-out) filters removed most users or items."""
    kept = stats["kept_by_filters"]
    if all(2 * a >= b for a, b in kept.values()):
        return None
    k = stats["kcore"]
    counts = ", ".join(f"{a:,} of {b:,} {what}" for what, (a, b) in kept.items())
    more = f"--kcore {max(k - 2, 3)} keeps more" if k > 3 else "a larger category keeps more"
    return f"the {k}-core filter removed most of the data: kept {counts}; {more} (shorter histories)"


def write_dataset(folder: str, name: str, inter: Interactions, users, seqs, texts, urls, max_len: int, stats: dict,
                  attrs: dict | None = None):
    by_raw = sorted(range(len(users)), key=lambda k: inter.users[users[k]])
    item_index: dict[int, int] = {}
    for k in by_raw:
        for code in seqs[k].tolist():
            if code not in item_index:
                item_index[code] = len(item_index)
    item_codes = list(item_index)

    def path(suffix):
        return os.path.join(folder, f"{name}.{suffix}")

    with open(path("user2index"), "w", encoding="utf-8") as f:
        for new, k in enumerate(by_raw):
            f.write(f"{inter.users[users[k]]}\t{new}\n")
    with open(path("item2index"), "w", encoding="utf-8") as f:
        for code in item_codes:
            f.write(f"{inter.items[code]}\t{item_index[code]}\n")
    with open(path("text"), "w", encoding="utf-8") as f:
        f.write(TEXT_HEADER)
        for code in item_codes:
            f.write(f"{inter.items[code]}\t{texts[code]}\n")
    if attrs:
        with open(path("attr"), "w", encoding="utf-8") as f:
            f.write(ATTR_HEADER)
            for code in item_codes:
                f.write(inter.items[code] + "".join(f"\t{v}" for v in attrs[code]) + "\n")
    n_url = sum(code in urls for code in item_codes)
    if n_url:
        with open(path("imageurl"), "w", encoding="utf-8") as f:
            f.write(URL_HEADER)
            for code in item_codes:
                if code in urls:
                    f.write(f"{inter.items[code]}\t{urls[code]}\n")

    rows = {"train": 0, "valid": 0, "test": 0}
    with open(path("train.inter"), "w", encoding="utf-8") as ftr, \
            open(path("valid.inter"), "w", encoding="utf-8") as fva, \
            open(path("test.inter"), "w", encoding="utf-8") as fte:
        for f in (ftr, fva, fte):
            f.write(INTER_HEADER)
        for uid, k in enumerate(by_raw):
            s = [str(item_index[c]) for c in seqs[k].tolist()]
            train = s[:-2]
            for cut in range(len(train) - 1, 0, -1):  # longest prefix first
                ftr.write(f"{uid}\t{' '.join(train[:cut][-max_len:])}\t{train[cut]}\n")
                rows["train"] += 1
            fva.write(f"{uid}\t{' '.join(train[-max_len:])}\t{s[-2]}\n")
            fte.write(f"{uid}\t{' '.join((train + [s[-2]])[-max_len:])}\t{s[-1]}\n")
            rows["valid"] += 1
            rows["test"] += 1

    n_inter = int(sum(len(s) for s in seqs))
    stats.update(
        users=len(users), items=len(item_codes), inters=n_inter,
        avg_len=round(n_inter / len(users), 4),
        density=round(n_inter / (len(users) * len(item_codes)), 6),
        rows=rows, items_with_image_url=n_url,
    )
    with open(path("stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")


def preprocess(
    input_dir: str,
    category: str,
    output_dir: str,
    fmt: str = "amazon2023",
    name: str | None = None,
    kcore_k: int = 5,
    max_len: int = 50,
    dedup: str = "first",
    max_bad_lines: int = 100,
    max_field_chars: int = 2000,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Raw files -> ``output_dir/<name>/``; returns the statistics (also in ``<name>.stats.json``)."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if kcore_k < 1 or max_len < 1:
        raise PipelineError("--kcore and --max-len must be >= 1")
    if not os.path.isdir(input_dir):
        raise PipelineError(f"{input_dir}: input folder not found")
    rf = FORMATS[fmt]
    name = name or category
    reviews_path = find_file(input_dir, rf.reviews.format(cat=category), rf.exts)
    meta_path = find_file(input_dir, rf.meta.format(cat=category), rf.exts)
    final = os.path.join(output_dir, name)
    if os.path.exists(final) and not overwrite:
        raise PipelineError(f"{os.path.abspath(final)}: already exists (use --overwrite to replace it)")

    stats: dict = {"name": name, "format": fmt, "category": category, "kcore": kcore_k, "max_len": max_len, "dedup": dedup}
    bad_r = BadLines(reviews_path, max_bad_lines)
    inter = read_reviews(reviews_path, rf, bad_r)
    if not len(inter.u):
        raise PipelineError(f"{reviews_path}: no valid review lines")
    wanted = {raw: code for code, raw in enumerate(inter.items)}
    bad_m = BadLines(meta_path, max_bad_lines)
    attrs: dict[int, tuple[str, str, str]] = {}
    texts, urls, no_text = read_meta(meta_path, rf, wanted, bad_m, max_field_chars, attrs)
    del wanted
    stats["malformed_lines"] = {"reviews": bad_r.count, "meta": bad_m.count}
    stats["meta_records_without_text"] = no_text
    for b in (bad_r, bad_m):
        if b.report():
            log(f"warning: {b.report()}")
    users, seqs = build_sequences(inter, texts, kcore_k, dedup, stats)
    if _mostly_removed(stats):
        log(f"warning: {_mostly_removed(stats)}")
    with staged_folder(final, overwrite=overwrite) as tmp:
        write_dataset(tmp, name, inter, users, seqs, texts, urls, max_len, stats, attrs)
    log(f"{name}: {_fmt(stats['users'])} users, {_fmt(stats['items'])} items, {_fmt(stats['inters'])} inters, "
        f"avg length {stats['avg_len']:.2f} -> {os.path.abspath(final)}")
    return stats


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("preprocess", description=__doc__,
                       help="raw Amazon reviews (2023 or 2018 format) -> pre-split atomic files")
    p.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default="amazon2023",
                   help="raw file layout (default: amazon2023)")
    p.add_argument("--input", required=True, metavar="RAW_DIR",
                   help="folder with <CAT>.jsonl[.gz] and meta_<CAT>.jsonl[.gz] (2018: .json[.gz])")
    p.add_argument("--category", required=True, metavar="CAT", help="category file stem, e.g. Industrial_and_Scientific")
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="writes OUT_DIR/<name>/<name>.*")
    p.add_argument("--name", default=None, help="dataset name (default: CAT)")
    p.add_argument("--kcore", type=int, default=5, help="iterative user/item k-core threshold (default: 5)")
    p.add_argument("--max-len", type=int, default=50, help="keep the last N items of each history (default: 50)")
    p.add_argument("--dedup", choices=["first", "last", "none"], default="first",
                   help="repeated (user, item) pairs: keep the first, the last, or all (default: first)")
    p.add_argument("--max-bad-lines", type=int, default=100,
                   help="malformed JSON lines tolerated per file before it is an error (default: 100)")
    p.add_argument("--max-field-chars", type=int, default=2000,
                   help="a metadata field this long or longer is dropped from the text (default: 2000)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/<name> if it exists")
    p.set_defaults(func=_main)


def _main(args) -> int:
    preprocess(args.input, args.category, args.output, fmt=args.fmt, name=args.name, kcore_k=args.kcore,
               max_len=args.max_len, dedup=args.dedup, max_bad_lines=args.max_bad_lines,
               max_field_chars=args.max_field_chars, overwrite=args.overwrite)
    return 0
