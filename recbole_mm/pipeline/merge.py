"""``recbole-mm merge``: several processed domains -> one pre-training dataset folder.

``merge --output OUT/<pretrain name> OUT/<d1> OUT/<d2> ...`` writes ``OUT/<pretrain name>/``:

* ``.item2index`` / ``.user2index``: raw ids prefixed by their domain (``"<d1>:<raw id>"``),
  domain d1's items first (indices 0..n1-1), then d2's (n1..n1+n2-1), ...; so an ASIN that
  appears in two categories stays two items, as in the reference pre-training sets;
* ``.{train,valid,test}.inter``: every domain's rows with its tokens shifted to the merged
  indices;
* ``.text`` keyed by the prefixed raw ids;
* ``.attr`` (item attributes, when a domain has one) keyed by the prefixed raw ids;
* every feature file ``.featNCLS`` that all domains have (same suffix, same dimension),
  stacked in the merged item order, so row i is still item index i;
* ``.pt_datasets``: one line, the domain names in order (the loader derives each item's
  domain from it);
* ``.stats.json`` with the per-domain and total counts.

The result is an ordinary dataset folder: ``run_pretrain.py -d <pretrain name>`` reads it
exactly as ``run_pretrain.py -d d1,d2`` reads the domains one by one.
"""

from __future__ import annotations

import glob
import json
import os
import re

from recbole_mm.data import formats
from recbole_mm.data.formats import header_line
from recbole_mm.data.readers import read_attributes, read_index_file, read_text, require_file
from recbole_mm.pipeline.common import PipelineError, dataset_file, dataset_name, staged_folder

INTER_HEADER = header_line(formats.INTER_HEADER)
SPLITS = ("train", "valid", "test")


def _feature_suffixes(folder: str) -> set[str]:
    name = dataset_name(folder)
    out = set()
    for p in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}.feat*")):
        suffix = os.path.basename(p)[len(name) + 1:]
        if re.fullmatch(r"feat\w+", suffix):
            out.add(suffix)
    return out


def _shift_inter(src: str, dst, user_off: int, item_off: int, n_users: int, n_items: int) -> int:
    rows = 0
    with open(src, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if header != INTER_HEADER:
            raise PipelineError(f"{src}:1: header must be {INTER_HEADER!r}, got {header[:80]!r}")
        for lineno, line in enumerate(f, 2):
            parts = line.rstrip("\r\n").split("\t")
            try:
                if len(parts) != 3:
                    raise ValueError("expected 3 tab-separated fields")
                user = int(parts[0])
                seq = [int(t) for t in parts[1].split()]
                target = int(parts[2])
                if not 0 <= user < n_users:
                    raise ValueError(f"user {user} is not in .user2index")
                bad = [t for t in seq + [target] if not 0 <= t < n_items]
                if bad:
                    raise ValueError(f"item {bad[0]} is not in .item2index")
            except ValueError as e:
                raise PipelineError(f"{src}:{lineno}: {e}") from None
            dst.write(f"{user + user_off}\t{' '.join(str(t + item_off) for t in seq)}\t{target + item_off}\n")
            rows += 1
    return rows


def _merge_attributes(domains, names, items, out_path, log) -> None:
    """``.attr`` files (Recformer / Reo-LM item attributes) -> one, raw ids prefixed, columns
    the union of the domains' in order of appearance (empty cells where a domain lacks one)."""
    has = [os.path.isfile(dataset_file(d, "attr")) for d in domains]
    if not any(has):
        return
    if not all(has):
        log("warning: .attr not in every domain; items of the others fall back to their .text")
    per, keys = [], []
    for d, it, h in zip(domains, items, has):
        k, rows = read_attributes(dataset_file(d, "attr"), it) if h else ([], [None] * len(it))
        keys += [x for x in k if x not in keys]
        per.append(rows)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("item_id:token" + "".join(f"\t{k}:token_seq" for k in keys) + "\n")
        for n, it, rows in zip(names, items, per):
            for raw, row in zip(it, rows):
                if row is not None:
                    f.write(f"{n}:{raw}" + "".join(f"\t{row.get(k, '')}" for k in keys) + "\n")


def merge(output: str, domains: list[str], overwrite: bool = False, log=print) -> dict:
    """Merge the dataset folders ``domains`` into ``output``; returns the statistics."""
    if len(domains) < 1:
        raise PipelineError("merge needs at least one domain folder")
    names = [dataset_name(d) for d in domains]
    if len(set(names)) != len(names):
        raise PipelineError(f"domain names must be distinct, got {names}")
    for d in domains:
        if not os.path.isdir(d):
            raise PipelineError(f"{d}: dataset folder not found")
    out_name = dataset_name(output)
    if out_name in names:
        raise PipelineError(f"the output name {out_name!r} is also a domain name")

    items = [read_index_file(require_file(dataset_file(d, "item2index"), "item index")) for d in domains]
    users = [read_index_file(require_file(dataset_file(d, "user2index"), "user index")) for d in domains]
    has_text = [os.path.isfile(dataset_file(d, "text")) for d in domains]
    texts = [read_text(dataset_file(d, "text"), it) if t else None for d, it, t in zip(domains, items, has_text)]
    suffix_sets = [_feature_suffixes(d) for d in domains]
    common = set.intersection(*suffix_sets)
    skipped = sorted(set.union(*suffix_sets) - common)
    if skipped:
        log(f"warning: feature files not in every domain are not merged: {', '.join(skipped)}")
    dims = {}
    for suffix in sorted(common):
        per = []
        for d, it in zip(domains, items):
            size = os.path.getsize(dataset_file(d, suffix))
            if size % (4 * len(it)):
                raise PipelineError(f"{dataset_file(d, suffix)}: {size} bytes is not {len(it)} float32 rows")
            per.append(size // (4 * len(it)))
        if len(set(per)) != 1:
            detail = ", ".join(f"{n}: {p}" for n, p in zip(names, per))
            raise PipelineError(f".{suffix} dimensions differ between domains ({detail}); "
                                "extract every domain with the same encoder")
        dims[suffix] = per[0]

    stats = {"name": out_name, "domains": names, "per_domain": {}, "features": dims}
    with staged_folder(output, overwrite=overwrite) as tmp:
        def path(suffix):
            return os.path.join(tmp, f"{out_name}.{suffix}")

        for suffix, per_domain in (("item2index", items), ("user2index", users)):
            with open(path(suffix), "w", encoding="utf-8") as f:  # "<domain>:<raw id>", one index
                off = 0
                for n, ids in zip(names, per_domain):
                    for k, raw in enumerate(ids):
                        f.write(f"{n}:{raw}\t{off + k}\n")
                    off += len(ids)
        if all(has_text):
            with open(path("text"), "w", encoding="utf-8") as f:
                f.write("item_id:token\ttext:token_seq\n")
                for n, it, tx in zip(names, items, texts):
                    for raw, t in zip(it, tx):
                        f.write(f"{n}:{raw}\t{t}\n")
        elif any(has_text):
            log("warning: .text not in every domain; the merged set has no .text")
        _merge_attributes(domains, names, items, path("attr"), log)
        totals = dict.fromkeys(SPLITS, 0)
        for split in SPLITS:
            with open(path(f"{split}.inter"), "w", encoding="utf-8") as f:
                f.write(INTER_HEADER + "\n")
                uoff = ioff = 0
                for d, n, it, us in zip(domains, names, items, users):
                    src = require_file(dataset_file(d, f"{split}.inter"), f"{split} interactions")
                    rows = _shift_inter(src, f, uoff, ioff, len(us), len(it))
                    stats["per_domain"].setdefault(n, {"users": len(us), "items": len(it)})[f"{split}_rows"] = rows
                    totals[split] += rows
                    uoff += len(us)
                    ioff += len(it)
        for suffix in sorted(common):
            with open(path(suffix), "wb") as out:
                for d in domains:
                    with open(dataset_file(d, suffix), "rb") as src:
                        while chunk := src.read(1 << 24):
                            out.write(chunk)
        with open(path("pt_datasets"), "w", encoding="utf-8") as f:
            f.write(",".join(names) + "\n")
        stats.update(users=sum(map(len, users)), items=sum(map(len, items)),
                     rows={s: totals[s] for s in SPLITS})
        with open(path("stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
    log(f"{out_name}: {len(names)} domains ({', '.join(names)}), {stats['users']:,} users, {stats['items']:,} items, "
        f"{totals['train']:,} train rows, features {', '.join(f'{s} ({d}-d)' for s, d in dims.items()) or 'none'} "
        f"-> {os.path.abspath(output)}")
    return stats


def register(sub) -> None:
    p = sub.add_parser("merge", description=__doc__, help="merge processed domains into one pre-training dataset folder")
    p.add_argument("--output", required=True, metavar="OUT_DIR/NAME", help="the merged dataset folder to write")
    p.add_argument("domains", nargs="+", metavar="DOMAIN_DIR", help="processed dataset folders OUT_DIR/<name>, in order")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.set_defaults(func=lambda a: merge(a.output, a.domains, overwrite=a.overwrite) and 0)
