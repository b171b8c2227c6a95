"""Reo-LM (ROMA): image soft-token and placeholder, adapter mixtures (token gates, domain
routing), losses, sampled-negative stage 1, transfer (all parameters / fix_enc by name), checkpoints; (integration) the real
all-MiniLM-L6-v2 on Scientific_mm."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import quick
from fixtures import assert_reload_identical, assert_steps_lower_loss_then_rank, make_tiny_bert

from recbole_mm.model.recformer import IMAGE_TYPE
from recbole_mm.model.reolm import AdapterMixture, ReoLM
from recbole_mm.quick_start import build_config, run
from recbole_mm.trainer import load_checkpoint



def _ids(ds):
    """Internal ids of an item without image (index 3 of the Tiny fixture) and one with (index 0)."""
    tok = ds.field2token_id["item_id"]
    return tok["3"], tok["0"]



def q(root, bb, **extra):
    """Fast-run overrides with the tiny backbone, in fp32 (exact comparisons)."""
    return quick(root, **{"backbone_path": bb, "plm_precision": "fp32", **extra})

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), layers=4)


def _model(root, bb, dataset="Tiny", stage="inductive_ft", **extra):
    from recbole_mm.data import create_dataset

    cfg = build_config("ReoLM", dataset, stage="pretrain" if stage == "pretrain" else "finetune",
                       config_dict=q(root, bb, train_stage=stage, **extra))
    ds = create_dataset(cfg)
    torch.manual_seed(0)
    return ReoLM(cfg, ds), cfg, ds


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.adapters:
            a.up_weight.copy_(torch.randn(a.up_weight.shape, generator=g) * 0.5)
            if a.gate is not None:
                a.gate.weight.copy_(torch.randn(a.gate.weight.shape, generator=g))


def test_image_soft_token_ends_each_item_on_the_sequence_side_only(tiny_root, tiny_bert):
    model, _, ds = _model(tiny_root, tiny_bert)
    NO_IMAGE, WITH_IMAGE = _ids(ds)
    assert not bool(model.image_presence[NO_IMAGE]) and bool(model.image_presence[WITH_IMAGE])
    # released: items encoded alone carry no image token
    assert not (model.item_tokens(torch.tensor([WITH_IMAGE, NO_IMAGE])).types == IMAGE_TYPE).any()
    tok = model.sequence_tokens(torch.tensor([[NO_IMAGE, WITH_IMAGE]]), torch.tensor([2]))
    img = torch.nonzero(tok.types == IMAGE_TYPE).squeeze(1)
    assert tok.item_positions[img].tolist() == [1, 2]  # one per item (most recent first) ...
    for k in (1, 2):  # ... its last token
        assert int(img[k - 1]) == int(torch.nonzero(tok.item_positions == k).max())
    w = model.embed_words(tok)
    torch.testing.assert_close(w[img[0]], model.img_proj(model.image_features[WITH_IMAGE]))
    torch.testing.assert_close(w[img[1]], model.void_img_emb)
    text = tok.types != IMAGE_TYPE
    torch.testing.assert_close(w[text], model.word_embeddings(tok.ids[text]))
    model.eval()
    with torch.no_grad():
        before, _ = model.encode_tokens(tok)
        model.image_features[WITH_IMAGE] += 1.0
        after, _ = model.encode_tokens(tok)
    assert not torch.allclose(before, after)
    # ours (image_token: first): first token of each item, items alone too
    first, _, _ = _model(tiny_root, tiny_bert, image_token="first")
    tok = first.item_tokens(torch.tensor([WITH_IMAGE, NO_IMAGE]))
    assert tok.positions[tok.types == IMAGE_TYPE].tolist() == [1, 1]


def test_placeholder_and_projection_get_gradients(tiny_root, tiny_bert):
    model, _, ds = _model(tiny_root, tiny_bert)
    NO_IMAGE, WITH_IMAGE = _ids(ds)
    model.train()
    cls, _ = model.encode_tokens(model.sequence_tokens(torch.tensor([[WITH_IMAGE, NO_IMAGE]]), torch.tensor([2])))
    cls.pow(2).sum().backward()
    assert model.void_img_emb.grad.abs().sum() > 0
    assert model.img_proj[0].weight.grad.abs().sum() > 0


def _adapter_outputs(m, x):
    """Every adapter's output, computed one by one: ``[T, n, H]``."""
    z = m.act(m.down(x)).view(x.size(0), m.n, m.size)
    return torch.stack([z[:, e] @ m.up_weight[e] + m.up_bias[e] for e in range(m.n)], 1)


def test_adapters_as_released_gates_and_routing():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    mean = AdapterMixture(6, 3, 4, scaling=2.0, mode="topk_mean", top_k=2).eval()
    assert torch.equal(mean(x), torch.zeros(5, 6))  # every up starts at zero
    with torch.no_grad():
        mean.up_weight.normal_(), mean.up_bias.normal_()
    each = _adapter_outputs(mean, x)
    top = mean.gate(x).topk(2, dim=-1).indices
    expected = 2.0 * each.gather(1, top.unsqueeze(-1).expand(-1, -1, 6)).mean(1)  # released: top-k mean
    torch.testing.assert_close(mean(x), expected, atol=1e-5, rtol=1e-5)
    mean.train()
    mean(x).sum().backward()
    assert mean.gate.weight.grad is None and mean.down.weight.grad.abs().sum() > 0  # indices only
    soft = AdapterMixture(6, 3, 4, scaling=1.0, mode="topk_softmax", top_k=2).eval()
    with torch.no_grad():
        soft.up_weight.normal_(), soft.up_bias.normal_()
    logits = soft.gate(x)
    top = logits.topk(2, dim=-1).indices
    g = torch.zeros(5, 4).scatter(1, top, torch.softmax(logits.gather(1, top), dim=-1))
    torch.testing.assert_close(soft(x), (g.unsqueeze(-1) * _adapter_outputs(soft, x)).sum(1), atol=1e-5, rtol=1e-5)
    routed = AdapterMixture(6, 3, 4, scaling=1.0, mode="route").eval()
    with torch.no_grad():
        routed.up_weight.normal_(), routed.up_bias.normal_()
    route = torch.tensor([0, 3, 1, 1, 2])
    each = _adapter_outputs(routed, x)
    torch.testing.assert_close(routed(x, route), each[torch.arange(5), route], atol=1e-5, rtol=1e-5)


def test_untrained_adapters_leave_the_backbone_unchanged(tiny_root, tiny_bert):
    model, _, _ = _model(tiny_root, tiny_bert)
    model.eval()
    tok = model.sequence_tokens(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    with torch.no_grad():
        with_adapters, _ = model.encode_tokens(tok)
        plain = model.ffn_adapter
        model.ffn_adapter = lambda *a: None
        without, _ = model.encode_tokens(tok)
        model.ffn_adapter = plain
        _randomise_adapters(model)
        trained, _ = model.encode_tokens(tok)
    torch.testing.assert_close(with_adapters, without)
    assert not torch.allclose(trained, without)


def test_domain_routing_in_pretraining_gate_in_finetuning(tiny_root, tiny_bert):
    model, _, ds = _model(tiny_root, tiny_bert, dataset="Tiny,Tiny2", stage="pretrain")
    n_bottom = len(model.layers) // 2
    assert model.mlm_layer == n_bottom - 2  # released hidden_states[n/2 - 1]
    assert all(a.gate is not None for a in model.adapters[:n_bottom])
    assert all(a.gate is None for a in model.adapters[n_bottom:])
    _randomise_adapters(model)
    model.eval()
    dom = ds.item_domain
    a, b = int(torch.nonzero(dom == 0)[1]), int(torch.nonzero(dom == 1)[0])  # an item of each domain
    tok = model.item_tokens(torch.tensor([a, b]))
    with torch.no_grad():
        base, _ = model.encode_tokens(tok)
        for layer in model.adapters[n_bottom:]:
            layer.up_weight[1] += torch.randn_like(layer.up_weight[1])  # domain 1's adapter only
        moved, _ = model.encode_tokens(tok)
    assert torch.equal(base[0], moved[0])  # domain 0 does not use adapter 1
    assert not torch.allclose(base[1], moved[1])
    # fine-tuning: a learned gate mixes the domain adapters (softmax of its top-k logits)
    ft, _, _ = _model(tiny_root, tiny_bert)
    assert [a.mode for a in ft.adapters] == ["topk_mean"] * n_bottom + ["topk_softmax"] * n_bottom


def test_losses_finite_with_mlm_at_the_middle_layer(tiny_root, tiny_bert):
    from recbole_mm.data import data_preparation

    for stage, dataset in (("inductive_ft", "Tiny"), ("pretrain", "Tiny,Tiny2")):
        model, cfg, ds = _model(tiny_root, tiny_bert, dataset=dataset, stage=stage,
                                **({"benchmark_filename": ["train"]} if stage == "pretrain" else {}))
        train = data_preparation(cfg, ds)[0]
        batch = next(iter(train))
        model.train()
        loss = model.calculate_loss(batch)
        loss.backward()
        assert math.isfinite(loss.item()), stage
        params = dict(model.named_parameters())
        assert params["mlm_head.transform.weight"].grad.abs().sum() > 0, stage
        assert params["adapters.0.up_weight"].grad.abs().sum() > 0, stage
        assert params[f"adapters.{len(model.layers) - 1}.up_weight"].grad.abs().sum() > 0, stage
        if stage == "pretrain":  # released pre-training passes no image (pretrain_images: False)
            assert params["img_proj.2.weight"].grad is None
        else:
            assert params["img_proj.2.weight"].grad.abs().sum() > 0, stage


def test_pretraining_image_token_is_a_word_unless_pretrain_images(tiny_root, tiny_bert):
    model, _, ds = _model(tiny_root, tiny_bert, dataset="Tiny,Tiny2", stage="pretrain")
    tok = model.item_tokens(torch.tensor([1, 2]))  # targets carry the image token, as released
    img = torch.nonzero(tok.types == IMAGE_TYPE).squeeze(1)
    assert img.numel() == 2
    torch.testing.assert_close(model.embed_words(tok), model.word_embeddings(tok.ids))
    ours, _, _ = _model(tiny_root, tiny_bert, dataset="Tiny,Tiny2", stage="pretrain", pretrain_images=True)
    assert not (ours.item_tokens(torch.tensor([1, 2])).types == IMAGE_TYPE).any()
    seq = ours.sequence_tokens(torch.tensor([[1, 2]]), torch.tensor([2]))
    img = torch.nonzero(seq.types == IMAGE_TYPE).squeeze(1)
    torch.testing.assert_close(ours.embed_words(seq)[img], ours.image_vectors(seq.items[img]))


def _expected_trainable(n_layers):
    names = []
    for i in range(n_layers):
        names += [f"adapters.{i}.{n}" for n in ("down.weight", "down.bias", "up_weight", "up_bias", "gate.weight", "gate.bias")]
    return sorted(names + ["img_proj.0.weight", "img_proj.0.bias", "img_proj.2.weight", "img_proj.2.bias", "void_img_emb"])


@pytest.mark.slow
def test_pretrain_then_transfer_trains_everything_or_adapters_with_fix_enc(tiny_root, tiny_bert, workdir):
    """Released fine-tuning (REFinetuneWrapper) trains every parameter; fix_enc: True only the
    adapters, gates and image projection (by name)."""
    from recbole_mm.data import create_dataset, data_preparation

    pre = run("ReoLM", "Tiny,Tiny2", "pretrain", overrides=q(tiny_root, tiny_bert, epochs=1,
                                                                 run_name="pt", train_batch_size=32))
    sd = load_checkpoint(pre["checkpoint"])["state_dict"]
    assert "adapters.3.up_weight" in sd and "adapters.3.gate.weight" not in sd  # top half: domain-routed
    cfg = build_config("ReoLM", "Tiny", config_dict=q(tiny_root, tiny_bert))
    ds = create_dataset(cfg)
    model = ReoLM(cfg, ds)
    model.load_pretrained(sd)
    assert all(p.requires_grad for p in model.parameters())  # default: everything trains
    torch.testing.assert_close(model.adapters[3].up_weight, sd["adapters.3.up_weight"])
    fixed_cfg = build_config("ReoLM", "Tiny", config_dict=q(tiny_root, tiny_bert, fix_enc=True))
    fixed = ReoLM(fixed_cfg, ds)
    fixed.load_pretrained(sd)
    trainable = sorted(n for n, p in fixed.named_parameters() if p.requires_grad)
    assert trainable == _expected_trainable(4)

    ft = run("ReoLM", "Tiny", pretrained=pre["checkpoint"],
             overrides=q(tiny_root, tiny_bert, epochs=1, num_negatives=8, run_name="ft"))
    assert ft["params"]["trainable"] == ft["params"]["total"]
    ft = run("ReoLM", "Tiny", pretrained=pre["checkpoint"],
             overrides=q(tiny_root, tiny_bert, epochs=2, fix_enc=True, num_negatives=8, run_name="ftfix"))
    assert ft["params"]["trainable"] == sum(p.numel() for n, p in fixed.named_parameters() if n in trainable)
    ckpt = load_checkpoint(ft["checkpoint"])
    # frozen weights are the pre-trained ones; the checkpoint reloads to identical scores
    torch.testing.assert_close(ckpt["state_dict"]["layers.0.output.dense.weight"], sd["layers.0.output.dense.weight"])
    _, _, test = data_preparation(fixed_cfg, ds)
    assert_reload_identical(ReoLM, fixed_cfg, ds, test, ft)


def test_stage1_item_encoder_gets_a_gradient_through_sampled_negatives(tiny_root, tiny_bert, monkeypatch):
    """Released stage 1: the label and num_negatives random items are re-encoded with gradient;
    num_negatives 0 (ours): all items against the frozen table (no gradient to the items)."""
    from recbole_mm.data import data_preparation

    model, cfg, ds = _model(tiny_root, tiny_bert, num_negatives=5)
    batch = next(iter(data_preparation(cfg, ds)[0]))
    seen, encode = [], ReoLM.candidate_vectors

    def keeping(self, items):
        vec = encode(self, items)
        vec.retain_grad()
        seen.append((items, vec))
        return vec

    monkeypatch.setattr(ReoLM, "candidate_vectors", keeping)
    model.on_epoch_start(0)
    assert not bool(model.table_ready)  # stage 1 with sampled negatives: no table to train against
    model.train()
    model.calculate_loss(batch).backward()
    (items, vec), = seen
    assert set(batch["item_id"].tolist()) <= set(items.tolist()) and items.numel() > batch["item_id"].unique().numel()
    assert vec.grad is not None and bool((vec.grad.norm(dim=1) > 0).all())
    full, _, _ = _model(tiny_root, tiny_bert, num_negatives=0)
    full.on_epoch_start(0)
    assert bool(full.table_ready) and not full.item_embeddings.requires_grad
    full.train()
    seen.clear()
    full.calculate_loss(batch).backward()
    assert seen == []


def test_without_image_features_every_item_gets_the_placeholder(tiny_root, tiny_bert):
    """Text-only corpora (img_suffix: ~): the placeholder everywhere, img_proj sized by img_size
    so that it transfers to image data."""
    with pytest.raises(ValueError, match="needs img_size"):
        _model(tiny_root, tiny_bert, img_suffix=None)
    model, _, ds = _model(tiny_root, tiny_bert, img_suffix=None, img_size=8)
    assert model.img_proj[0].in_features == 8 and not bool(model.image_presence.any())
    tok = model.sequence_tokens(torch.tensor([list(_ids(ds))]), torch.tensor([2]))
    img = torch.nonzero(tok.types == IMAGE_TYPE).squeeze(1)
    w = model.embed_words(tok)
    torch.testing.assert_close(w[img], model.void_img_emb.expand(2, -1))
    with_images, _, _ = _model(tiny_root, tiny_bert)
    with_images.load_state_dict(model.state_dict())  # same parameters: the checkpoint transfers


@pytest.mark.slow
@pytest.mark.integration
def test_reolm_real_minilm_on_scientific(shared_data, workdir):
    """The real all-MiniLM-L6-v2 with the CLIP image features of Scientific_mm: a few steps
    lower the loss, full ranking runs."""
    from recbole_mm.data import create_dataset, data_preparation

    cfg = build_config("ReoLM", "Scientific_mm", config_dict={
        "data_path": str(shared_data), "use_gpu": False, "plm_precision": "fp32", "show_progress": False, "state": "WARNING",
        "train_batch_size": 8, "eval_batch_size": 16, "max_tokens": 64, "item_encode_batch_size": 512})
    ds = create_dataset(cfg)
    torch.manual_seed(0)
    model = ReoLM(cfg, ds)
    assert model.image_features.shape[1] == 512 and len(model.adapters) == 6
    train, valid, _ = data_preparation(cfg, ds)
    assert_steps_lower_loss_then_rank(model, next(iter(train)), valid, ds.item_num, reseed=0)  # the same MLM masks every step
