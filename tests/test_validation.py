"""Every corrupted input fails at load with one clear line (file, line/row, expectation) and writes nothing."""

import os
import shutil

import numpy as np
import pytest

from recbole_mm.cli import main


def _edit(path, fn):
    with open(path) as f:
        lines = f.readlines()
    lines = fn(lines)
    with open(path, "w") as f:
        f.writelines(lines)


def _replace_line(n, text):
    def fn(lines):
        lines[n - 1] = text
        return lines

    return fn


def _truncate_bytes(k):
    def fn(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-k])

    return fn


def _nan_row(row):
    def fn(path):
        arr = np.fromfile(path, dtype="<f4").reshape(40, -1)
        arr[row, 3] = np.nan
        arr.tofile(path)

    return fn


CASES = {
    # name: (file suffix, corruption (lines-> lines, or path->None for binary), expected fragments)
    "inter_header": ("train.inter", _replace_line(1, "user_id:token\titem_id_list:token\titem_id:token\n"), ["Tiny.train.inter:1", "header must be"]),
    "inter_columns": ("train.inter", _replace_line(5, "0\t1 2\t3\t9\n"), ["Tiny.train.inter", "3 tab-separated columns", "line 5"]),
    "inter_missing_column": ("valid.inter", _replace_line(3, "1\t2 3\n"), ["Tiny.valid.inter:3", "3 tab-separated columns"]),
    "inter_unknown_item": ("test.inter", _replace_line(4, "2\t1 2 999\t3\n"), ["Tiny.test.inter:4", "'999' is not in .item2index"]),
    "inter_unknown_target": ("train.inter", _replace_line(6, "0\t1 2\tB07\n"), ["Tiny.train.inter:6", "item_id token 'B07'"]),
    "inter_unknown_user": ("train.inter", _replace_line(2, "u9\t1 2\t3\n"), ["Tiny.train.inter:2", "user_id token 'u9' is not in .user2index"]),
    "inter_empty_history": ("train.inter", _replace_line(3, "0\t\t3\n"), ["Tiny.train.inter:3", "empty item_id_list"]),
    "item2index_gap": ("item2index", _replace_line(3, "A000002\t77\n"), ["Tiny.item2index", "without gaps"]),
    "item2index_duplicate": ("item2index", _replace_line(3, "A000002\t1\n"), ["Tiny.item2index:3", "index 1 is used twice"]),
    "item2index_format": ("item2index", _replace_line(2, "A000001 1\n"), ["Tiny.item2index:2", "expected '<raw id>\\t<integer index>'"]),
    "text_missing_item": ("text", lambda lines: lines[:5] + lines[6:], ["Tiny.text", "item 'A000004'", "has no text"]),
    "text_header": ("text", _replace_line(1, "item:token\ttext:token_seq\n"), ["Tiny.text:1", "header must be"]),
    "feat_not_float32": ("feat1CLS", _truncate_bytes(2), ["Tiny.feat1CLS", "not a positive multiple of 4"]),
    "feat_row_count": ("feat1CLS", _truncate_bytes(16 * 4), ["Tiny.feat1CLS", "cannot be 40 rows"]),
    "feat_nan": ("feat3CLS", _nan_row(5), ["Tiny.feat3CLS:row 5", "'A000005' has NaN or Inf"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_input_fails_with_one_line_and_writes_nothing(case, tiny_root, tmp_path, workdir, capsys):
    suffix, corrupt, expected = CASES[case]
    data = tmp_path / "data"
    shutil.copytree(tiny_root / "Tiny", data / "Tiny")
    target = data / "Tiny" / f"Tiny.{suffix}"
    if suffix.startswith("feat"):
        corrupt(target)
    else:
        _edit(target, corrupt)
    run_dir = workdir / "run"
    run_dir.mkdir()
    os.chdir(run_dir)
    code = main(["finetune", "-m", "SASRec", "-d", "Tiny", f"--data_path={data}", "--plm_suffix=feat1CLS",
                 "--img_suffix=feat3CLS", "--epochs=1", "--use_gpu=False"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert os.listdir(run_dir) == []  # no log/, saved/, tensorboard files


def test_feature_dim_mismatch_with_config(tiny_root, workdir, capsys):
    code = main(["finetune", "-m", "SASRec", "-d", "Tiny", f"--data_path={tiny_root}", "--plm_suffix=feat1CLS",
                 "--plm_size=32", "--use_gpu=False"])
    err = capsys.readouterr().err
    assert code == 2 and "Tiny.feat1CLS" in err and "expected 40" in err
    assert os.listdir(workdir) == []


def test_missing_dataset_folder(tmp_path, workdir, capsys):
    code = main(["finetune", "-m", "SASRec", "-d", "Nope", f"--data_path={tmp_path}", "--use_gpu=False"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset folder not found" in err and "Nope" in err
    assert os.listdir(workdir) == []
