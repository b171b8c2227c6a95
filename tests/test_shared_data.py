"""Integration on ../shared/data (skipped when absent)."""

import numpy as np
import pytest

from recbole_mm.config import Config
from recbole_mm.data import create_dataset, data_preparation

pytestmark = pytest.mark.integration


def test_scientific_mm_loads_validated_and_aligned(shared_data):
    config = Config("SASRec", "Scientific_mm", cmd_overrides={
        "data_path": str(shared_data), "plm_suffix": "feat1CLS", "img_suffix": "feat3CLS", "use_gpu": False,
        "trim_batch_seq": True})
    ds = create_dataset(config)
    assert ds.item_num == 1586 and ds.user_num == 2929
    assert config["plm_size"] == 512 and config["img_size"] == 512
    raw = np.fromfile(shared_data / "Scientific_mm" / "Scientific_mm.feat3CLS", dtype="<f4").reshape(1585, 512)
    iid = ds.field2token_id["item_id"]["100"]  # internal id of item index 100 (RecBole's numbering)
    assert np.allclose(ds.features["image"][iid].numpy(), raw[100])
    assert len(ds.item_text) == 1586 and ds.item_text[1]
    train, valid, test = data_preparation(config, ds)
    assert len(train._dataset) == 10928 and len(valid._dataset) == 2928 and len(test._dataset) == 2928
    lengths = train._dataset.inter_feat["item_length"].float()
    assert lengths.mean().item() == pytest.approx(3.405, abs=0.01)
    assert max(b["item_id_list"].shape[1] for b in train) <= int(lengths.max())
