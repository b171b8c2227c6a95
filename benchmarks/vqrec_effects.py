#!/usr/bin/env python
"""Effects of VQRec's fidelity keys on the tiny test fixtures (docs/fidelity.md, section VQ-Rec), one seed:
contrastive_mask inf/zero (pre-training on Tiny+Tiny2, 10 epochs), permutation
straight_through/reference (fine-tuning, 20 epochs, reassign_steps 5) and scratch_reassign
False/True (from scratch, 20 epochs).  code_dim 4, code_cap 16.  Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/vqrec_effects.py
"""
import json
import os
import sys
import tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import recbole_mm
from fixtures import make_dataset
from conftest import quick
from recbole_mm.quick_start import run
root = tempfile.mkdtemp(); make_dataset(root, "Tiny", seed=0); make_dataset(root, "Tiny2", n_users=80, n_items=30, seed=1)
os.chdir(root)
C = dict(code_dim=4, code_cap=16)
out = {}
for mask in ("inf", "zero"):
    pre = run("VQRec", "Tiny,Tiny2", "pretrain", overrides=quick(root, epochs=10, run_name=f"pt_{mask}", contrastive_mask=mask, **C))
    out[f"pretrain contrastive_mask={mask}"] = pre["history"][-1]["train_loss"]
    for perm in ("straight_through", "reference"):
        if mask == "zero" and perm == "reference":
            continue
        ft = run("VQRec", "Tiny", mode="inductive", pretrained=pre["checkpoint"], overrides=quick(root, epochs=20, reassign_steps=5, permutation=perm, run_name=f"ft_{mask}_{perm}", **C), saved=False)
        out[f"ft after pt({mask}) permutation={perm}"] = ft["test"]
for sr in (False, True):
    r = run("VQRec", "Tiny", mode="inductive", overrides=quick(root, epochs=20, scratch_reassign=sr, **C), saved=False)
    out[f"scratch scratch_reassign={sr}"] = r["test"]
print(json.dumps(out, indent=1))
