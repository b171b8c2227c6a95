"""``recbole-mm import-checkpoint``: a RUCAIBox/UniSRec pre-trained file (a pickled Config, no
``format`` key) converted without running anything from it; anything else refused."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from conftest import quick

from recbole_mm.cli import main
from recbole_mm.quick_start import build_config
from recbole_mm.trainer import load_checkpoint


def _unisrec(tiny_root, seed):
    from recbole_mm.data import create_dataset
    from recbole_mm.model.unisrec import UniSRec

    cfg = build_config("UniSRec", "Tiny", config_dict=quick(tiny_root, train_stage="inductive_ft"))
    torch.manual_seed(seed)
    return UniSRec(cfg, create_dataset(cfg))


@pytest.fixture
def reference_modules(monkeypatch):
    """Stand-ins for the reference's ``config.Config`` (RecBole Config subclass) and
    ``unisrec.UniSRec``, registered where the reference's pickles point."""
    config_mod, model_mod = types.ModuleType("config"), types.ModuleType("unisrec")

    class Config:  # what the reference pickles: an object whose state holds the settings
        def __init__(self, settings):
            self.final_config_dict = settings
            self.model_class = model_mod.UniSRec

    class UniSRec:
        pass

    Config.__module__, UniSRec.__module__ = "config", "unisrec"
    Config.__qualname__, UniSRec.__qualname__ = "Config", "UniSRec"
    config_mod.Config, model_mod.UniSRec = Config, UniSRec
    monkeypatch.setitem(sys.modules, "config", config_mod)
    monkeypatch.setitem(sys.modules, "unisrec", model_mod)
    return Config


def _reference_file(path, model, config_cls, extra=None):
    """A file laid out as the reference's ``saved/UniSRec-FHCKM-300.pth``."""
    state = model.state_dict()
    state["plm_embedding.weight"] = torch.randn(5, 16)  # the reference keeps its feature table in the model
    payload = {
        "config": config_cls({"dataset": "FHCKM", "device": torch.device("cpu"), "n_exps": 8, "lambda": 1e-3}),
        "epoch": 300,
        "state_dict": state,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
    }
    payload.update(extra or {})
    torch.save(payload, path)
    return state


def test_converts_a_reference_file_and_it_transfers(tiny_root, tmp_path, reference_modules):
    ref_model = _unisrec(tiny_root, seed=1)
    src, dst = tmp_path / "UniSRec-FHCKM-300.pth", tmp_path / "ours.pth"
    state = _reference_file(src, ref_model, reference_modules)
    with pytest.raises(Exception):
        torch.load(src, weights_only=True)  # why the command exists
    assert main(["import-checkpoint", str(src), str(dst)]) == 0

    ckpt = load_checkpoint(str(dst))  # weights_only=True
    assert ckpt["model"] == "UniSRec" and ckpt["dataset"] == "FHCKM" and ckpt["epoch"] == 300
    assert ckpt["config"]["reference_config"]["n_exps"] == 8
    assert "plm_embedding.weight" not in ckpt["state_dict"]
    assert set(ckpt["state_dict"]) == set(ref_model.state_dict())
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, state[k]), k

    fresh = _unisrec(tiny_root, seed=2)
    fresh.load_pretrained(ckpt["state_dict"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref_model.state_dict()[k]), k


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_refuses_a_pickle_naming_any_other_callable_without_running_it(tiny_root, tmp_path, reference_modules, capsys):
    marker = tmp_path / "ran"
    src, dst = tmp_path / "evil.pth", tmp_path / "out.pth"
    _reference_file(src, _unisrec(tiny_root, seed=1), reference_modules, extra={"note": _Evil(marker)})
    assert main(["import-checkpoint", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{os.system.__module__}.system" in err and "not admitted" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not dst.exists()


@pytest.mark.parametrize("what", ["builtins.eval", "not a zip", "unknown key"])
def test_refuses_other_inputs_in_one_line(tiny_root, tmp_path, reference_modules, capsys, what):
    src, dst = tmp_path / "ref.pth", tmp_path / "out.pth"
    model = _unisrec(tiny_root, seed=1)
    if what == "builtins.eval":
        _reference_file(src, model, reference_modules, extra={"x": _Eval()})
    elif what == "not a zip":
        src.write_bytes(b"\x80\x02}q\x00.")
    else:
        state = model.state_dict()
        state["mystery.weight"] = torch.zeros(2)
        torch.save({"config": None, "epoch": 1, "state_dict": state}, src)
    assert main(["import-checkpoint", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err
    assert {"builtins.eval": "eval, which is not admitted", "not a zip": "not a torch zip", "unknown key": "mystery.weight"}[what] in err
    assert not dst.exists()
