"""Config layering, model lookup and the command line."""

import subprocess
import sys

import pytest

from conftest import quick
from recbole_mm.cli import build_parser, parse_overrides
from recbole_mm.config import Config, layered_prop_files
from recbole_mm.utils import get_model


def test_layering_order(tiny_root, tmp_path, monkeypatch):
    props = tmp_path / "props"
    props.mkdir()
    (props / "overall.yaml").write_text("learning_rate: 0.1\nepochs: 1\nstopping_step: 1\nn_layers: 1\ntrain_neg_sample_args: ~\n")
    (props / "finetune.yaml").write_text("learning_rate: 0.2\nepochs: 2\n")
    (props / "SASRec.yaml").write_text("learning_rate: 0.3\nn_layers: 3\n")
    (props / "Tiny.yaml").write_text("learning_rate: 0.4\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("learning_rate: 0.5\nstopping_step: 5\n")
    monkeypatch.setenv("RECBOLE_MM_PROPS", str(props))
    (props / "recbole_models.yaml").write_text("epochs: 7\nhidden_dropout_prob: 0.3\n")
    assert [p.split("/")[-1] for p in layered_prop_files("SASRec", "Tiny", "finetune", recbole_model=True)] == [
        "overall.yaml", "finetune.yaml", "recbole_models.yaml", "SASRec.yaml", "Tiny.yaml"]
    assert "recbole_models.yaml" not in " ".join(layered_prop_files("UniSRec", "Tiny", "finetune"))
    (props / "SASRec.Tiny.yaml").write_text("train_batch_size: 96\n")  # a model's settings for one dataset
    assert [p.split("/")[-1] for p in layered_prop_files("SASRec", "Tiny", "finetune", recbole_model=True)][-2:] == [
        "Tiny.yaml", "SASRec.Tiny.yaml"]
    assert "SASRec.Tiny.yaml" not in " ".join(layered_prop_files("GRU4Rec", "Tiny", "finetune", recbole_model=True))
    c = Config("SASRec", "Tiny", config_file_list=[str(extra)],
               cmd_overrides={"data_path": str(tiny_root), "learning_rate": "0.6"})
    assert c["learning_rate"] == 0.6          # command line beats everything
    assert c["stopping_step"] == 5            # --config_files beat props/
    assert c["n_layers"] == 3                 # <Model>.yaml beats overall.yaml and RecBole's SASRec.yaml
    assert c["epochs"] == 7                   # recbole_models.yaml (RecBole's own models) beats the stage yaml
    assert c["hidden_dropout_prob"] == 0.3
    assert c["hidden_size"] == 64             # RecBole's own SASRec default underneath
    assert c["train_batch_size"] == 96        # props/<Model>.<dataset>.yaml beats props/<dataset>.yaml
    c2 = Config("SASRec", "Tiny", cmd_overrides={"data_path": str(tiny_root)})
    assert c2["learning_rate"] == 0.4         # <dataset>.yaml beats <Model>.yaml


def test_default_props_and_data_path(tiny_root):
    c = Config("SASRec", "Tiny", cmd_overrides=quick(tiny_root))
    assert c["trim_batch_seq"] is False  # RecBole's models: RecBole's batch width (props/recbole_models.yaml)
    assert Config("UniSRec", "Tiny", cmd_overrides=quick(tiny_root))["trim_batch_seq"] is True
    assert c["valid_metric"] == "NDCG@10" and c["benchmark_filename"] == ["train", "valid", "test"]
    assert c["data_path"].endswith("Tiny") and c["run_stage"] == "finetune"
    c = Config("SASRec", "A,B", stage="pretrain")
    assert c["data_root"].rstrip("/").endswith("dataset/pretrain") and c["pretrain_domains"] == ["A", "B"]


def test_model_lookup():
    from recbole.model.sequential_recommender import GRU4Rec

    from recbole.model.sequential_recommender import SASRec
    from recbole_mm.model.unisrec import UniSRec

    assert get_model("GRU4Rec") is GRU4Rec
    assert get_model("sasrec") is SASRec and get_model("gru4rec") is GRU4Rec  # case-insensitive
    assert get_model("unisrec") is UniSRec and get_model("UNISREC") is UniSRec
    with pytest.raises(ValueError, match="unknown model 'NoSuchRec'"):
        get_model("NoSuchRec")


def test_overrides_both_forms():
    assert parse_overrides(["--a=1", "--b", "x", "--flag", "--c=d=e"]) == {"a": "1", "b": "x", "flag": "True", "c": "d=e"}
    with pytest.raises(SystemExit):
        parse_overrides(["stray"])


@pytest.mark.slow
def test_help_explains_every_flag():
    for script, flags in (("run_finetune.py", ["--model", "--dataset", "--pretrained", "--mode", "--config_files", "--resume"]),
                          ("run_pretrain.py", ["--model", "--dataset", "--nproc", "--config_files", "--resume"])):
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0
        for flag in flags:
            assert flag in out.stdout
        assert "--key=value" in out.stdout
    sub = build_parser()._subparsers._group_actions[0].choices
    for parser in sub.values():
        for action in parser._actions:
            assert action.help, action.option_strings


def test_props_ship_in_the_package_and_a_missing_folder_is_an_error(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    import recbole_mm
    from recbole_mm.config import PACKAGE_PROPS, props_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert props_dir() == PACKAGE_PROPS == Path(recbole_mm.__file__).resolve().parent / "props"
    assert os.path.realpath(os.path.join(root, "props")) == str(PACKAGE_PROPS)  # props/ links to it: one copy
    assert os.path.islink(os.path.join(root, "props"))
    monkeypatch.setenv("RECBOLE_MM_PROPS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="RECBOLE_MM_PROPS"):
        layered_prop_files("UniSRec", "Tiny", "finetune")


def test_tilde_and_null_on_the_command_line_mean_none(tiny_root):
    """``--save_step=~`` means what ``save_step: ~`` means in YAML (the error messages offer ``~``);
    any other string is still checked and refused with the key named."""
    from recbole_mm.errors import ConfigError

    for none in ("~", "null", "NULL"):
        c = Config("SASRec", "Tiny", cmd_overrides={**quick(tiny_root), "save_step": none, "steps_per_epoch": none})
        assert c["save_step"] is None and c["steps_per_epoch"] is None
    c = Config("SASRec", "Tiny", cmd_overrides={**quick(tiny_root), "save_step": "3"})
    assert c["save_step"] == 3
    with pytest.raises(ConfigError, match="--save_step"):
        Config("SASRec", "Tiny", cmd_overrides={**quick(tiny_root), "save_step": "tilde"})
