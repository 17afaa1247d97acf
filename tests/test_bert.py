"""The BERT family: twins that match layer for layer, padding masks, BERT_BASE/LARGE geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gwtn_dist.config import ConfigError, load_config
from gwtn_dist.models.bert.config import BertModelConfig, BertWidening
from gwtn_dist.models.bert.net import Bert
from gwtn_dist.models.bridge import Bridges, merge_bridges
from gwtn_dist.models.family import build_thin, build_wide, family_for
from tests.conftest import REPO


def tiny() -> BertModelConfig:
    return BertModelConfig(hidden=32, layers=3, heads=2, head_dim=16, ffn=64,
                           vocab_size=50, max_len=24, dropout=0.0,
                           widen=BertWidening(attention_mult=3, ffn_mult=2))


def batch(lengths: list[int], t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids (B, t) padded with [PAD] = 0 after each row's length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_wide_twin_widens_inside_and_keeps_every_layer_output_shape():
    cfg = tiny()
    thin, wide = build_thin(cfg).eval(), build_wide(cfg).eval()
    assert [n for n, _ in thin.blocks()] == [n for n, _ in wide.blocks()] == [
        "embeddings", "layer.0", "layer.1", "layer.2"]
    assert family_for(cfg).imitation_points(thin, cfg) == ["layer.0", "layer.1", "layer.2"]
    assert wide.layer[0].attention.query.out_features == 2 * 16 * 3  # heads × head_dim × 3
    assert wide.layer[0].attention.output.out_features == 32  # back to the hidden size
    assert wide.layer[0].intermediate.out_features == 128
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in thin.parameters())
    x = batch([12, 7])
    for k in range(4):
        assert thin(x, upto=k).shape == wide(x, upto=k).shape == (2, 12, 32)
    assert thin(x).shape == (2, 12, 50)


def test_a_wider_hidden_twin_is_compared_through_lifts_that_leave_the_thin_net_alone():
    cfg = tiny()
    cfg.widen.boundary_mult = 2
    thin, wide = build_thin(cfg).eval(), build_wide(cfg).eval()
    assert wide.shape.hidden == 64 and thin.shape.hidden == 32
    points = family_for(cfg).imitation_points(thin, cfg)
    bridges = Bridges(thin, wide, points, family_for(thin))
    assert bridges.lift_only
    x = batch([12, 7])
    for k, point in enumerate(points, start=1):
        pair = bridges.pair(point)
        assert pair.lift.shape == (64, 32) and pair.back is None
        assert torch.equal(pair.product(), torch.eye(32))
        h = thin(x, upto=k)  # (2, 12, 32)
        lifted = pair.lifted(h)
        assert lifted.shape == wide(x, upto=k).shape == (2, 12, 64)
        # P has orthonormal columns at the start, so lifting keeps each token's norm.
        torch.testing.assert_close(lifted.norm(dim=-1), h.norm(dim=-1), rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in thin.state_dict().items()}
    with torch.no_grad():
        bridges.pair(points[0]).lift.mul_(3.0)  # a trained lift: still nothing to fold
    merge_bridges(thin, bridges)
    assert all(torch.equal(before[k], v) for k, v in thin.state_dict().items())


def test_padding_is_masked_and_the_prefix_is_the_full_forward():
    net = build_thin(tiny()).eval()
    x = batch([12, 6])
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][1, 6:] = 17  # different content behind the mask
    a, b = net(x), net(y)
    assert torch.allclose(a[1, :6], b[1, :6], atol=1e-5)
    assert torch.allclose(a[0], b[0])
    # The last layer's output, through the head, is the forward's logits.
    assert torch.allclose(net.head(net(x, upto=3)), a, atol=1e-5)
    # select keeps only the chosen positions' logits.
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen[0, 3], chosen[1, 5] = True, True
    assert torch.allclose(net(x, select=chosen), a[chosen], atol=1e-5)


def test_attention_probabilities_match_sdpa_and_ignore_padding():
    net = build_thin(tiny()).eval()
    x = batch([12, 5])
    h, probs = net(x, upto=2, attention=True)
    assert torch.allclose(h, net(x, upto=2), atol=1e-5)  # same output as the SDPA path
    assert probs.shape == (2, 2, 12, 12)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 12), atol=1e-5)
    assert probs[1, :, :, 5:].abs().max() == 0  # padded keys get exactly nothing
    assert torch.isfinite(probs.clamp_min(1e-30).log()).all()


def test_a_training_step_lowers_the_masked_lm_loss():
    torch.manual_seed(0)
    net = build_thin(tiny())
    x = batch([12, 12, 9, 12])
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("overrides, names", [
    (["model.family=bert"], ["data.dataset", "text"]),
    (["model.family=bert", "data.dataset=text", "model.heads=0"], ["model.heads"]),
    (["model.family=bert", "data.dataset=text", "model.widen.boundary_mult=0"],
     ["model.widen.boundary_mult"]),
    (["imitate.attention_weight=1"], ["imitate.attention_weight", "BERT"]),
])
def test_bert_config_errors_name_the_key(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for name in names:
        assert name in str(err.value)


def test_bert_base_geometry_builds_and_trains_a_step():
    cfg = load_config(REPO / "configs/bert_base.yaml").model
    thin = build_thin(cfg)
    # Hugging Face's BertForMaskedLM (bert-base-uncased) has 109,514,298 parameters.
    assert sum(p.numel() for p in thin.parameters()) == 109_514_298
    assert isinstance(thin, Bert) and len(thin.layer) == 12
    x = batch([16, 10], t=16)
    labels = torch.full((2, 16), -100)
    labels[:, 1] = 7
    loss = F.cross_entropy(thin(x, select=labels != -100), labels[labels != -100])
    loss.backward()
    torch.optim.SGD(thin.parameters(), lr=0.1).step()
    assert thin.embeddings.word_embeddings.weight.grad is not None


def test_bert_large_geometry_builds_and_runs_a_forward():
    thin = build_thin(load_config(REPO / "configs/bert_large.yaml").model)
    # bert-large-uncased with its masked-LM head: 335,174,458 parameters.
    assert sum(p.numel() for p in thin.parameters()) == 335_174_458
    assert len(thin.layer) == 24
    with torch.no_grad():
        assert thin(batch([8], t=8)).shape == (1, 8, 30522)
