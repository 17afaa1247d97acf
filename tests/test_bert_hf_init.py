"""A Hugging Face BertForMaskedLM folder as the wide twin (``wide.init``) or as the thin net's
starting point (``imitate.init``): same logits as HF's model, and one-line errors naming the key
and both shapes when it does not fit. The HF models are built here at random (no download)."""

from __future__ import annotations

import pytest
import torch

from gwtn_dist import checkpoint
from gwtn_dist.cli import main
from gwtn_dist.config import ConfigError
from gwtn_dist.models.bert.names import hf_name, hf_state_dict, our_name
from gwtn_dist.models.family import build_shape, build_thin, build_wide, family_for
from gwtn_dist.stages.common import load_init
from gwtn_dist.stages.teacher_cache import teacher_settings
from tests.test_bert import batch, tiny
from tests.test_bert_pipeline import run_args, write_shards

transformers = pytest.importorskip("transformers")


def hf_bert(folder, *, hidden=32, layers=3, heads=2, ffn=64, vocab=50, max_len=24,
            safetensors=True, seed=0):
    """A random BertForMaskedLM with every tensor off its init (LayerNorms and biases too),
    saved with ``save_pretrained``; returns the model in eval mode."""
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if not safetensors:  # what older transformers write: the whole state dict, tied copies too
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model.eval()


def logits_agree(ours: torch.nn.Module, hf, x) -> None:
    with torch.no_grad():
        mine = ours.eval()(x)
        theirs = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max() < 1e-4  # padded positions too


def test_the_name_map_goes_both_ways_and_covers_hugging_faces_names():
    cfg = tiny()
    ours = build_thin(cfg).state_dict()
    assert all(our_name(hf_name(name)) == name for name in ours)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=24))
    # (HF's decoder bias is its cls.predictions.bias under a second name.)
    theirs = {k for k in hf.state_dict() if not k.endswith(("position_ids", "token_type_ids"))
              and k != "cls.predictions.decoder.bias"}
    assert set(hf_state_dict(build_thin(cfg))) == theirs


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_a_hugging_face_folder_is_the_wide_twin_with_the_same_logits(tmp_path, safetensors):
    # HF heads are hidden / heads wide: the twin keeps head_dim (attention_mult 1) and widens
    # the feed-forward (64 × 2).
    cfg = tiny()
    cfg.widen.attention_mult, cfg.widen.ffn_mult = 1, 2
    hf = hf_bert(tmp_path / "hf", ffn=128, safetensors=safetensors)
    weights = "model.safetensors" if safetensors else "pytorch_model.bin"
    assert (tmp_path / "hf" / weights).exists()
    wide = load_init(family_for(cfg), build_wide(cfg), str(tmp_path / "hf"))
    logits_agree(wide, hf, batch([12, 7, 3]))


def test_a_hugging_face_folder_is_the_thin_nets_start(tmp_path):
    hf = hf_bert(tmp_path / "hf")
    thin = load_init(family_for(tiny()), build_thin(tiny()), str(tmp_path / "hf"), "imitate.init")
    logits_agree(thin, hf, batch([12, 9], seed=3))


def test_what_does_not_fit_is_one_line_naming_the_key_and_both_shapes(tmp_path):
    hf_bert(tmp_path / "hf", ffn=128)
    cfg = tiny()
    cfg.widen.attention_mult, cfg.widen.ffn_mult = 1, 3  # 192, not 128
    with pytest.raises(ConfigError) as info:
        load_init(family_for(cfg), build_wide(cfg), str(tmp_path / "hf"))
    line = str(info.value)
    assert "\n" not in line and line.startswith("wide.init: ")
    assert ("bert.encoder.layer.0.intermediate.dense.weight has shape (128, 32), but the net's "
            "layer.0.intermediate.weight has (192, 32)") in line
    # The twin's widened heads: no HF model has them, and the message says why.
    cfg.widen.attention_mult = 3
    with pytest.raises(ConfigError, match=r"heads × head_dim = hidden, but this net has 2 × 48"):
        load_init(family_for(cfg), build_wide(cfg), str(tmp_path / "hf"))
    # Same tensor shapes, other heads: only config.json tells.
    cfg = tiny()
    cfg.heads, cfg.head_dim = 4, 8
    with pytest.raises(ConfigError, match="num_attention_heads 2; the net has 4"):
        load_init(family_for(cfg), build_thin(cfg), str(tmp_path / "hf"), "imitate.init")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_init(family_for(tiny()), build_thin(tiny()), str(tmp_path / "empty"), "imitate.init")


def test_the_stages_take_hugging_face_folders_through_the_cli(tmp_path, capsys):
    (tmp_path / "text").mkdir()
    shards = write_shards(tmp_path / "text", test_every=10)
    # configs/bert_tiny_cpu.yaml: hidden 32, 2 layers, 2 heads of 16, ffn 64, 512 words, 64
    # positions; the twin's feed-forward ×4 (256), its heads kept (attention_mult 1).
    shape = {"hidden": 32, "layers": 2, "heads": 2, "vocab": 512, "max_len": 64}
    wide_hf = hf_bert(tmp_path / "wide_hf", ffn=256, **shape, seed=1)
    thin_hf = hf_bert(tmp_path / "thin_hf", ffn=64, **shape, seed=2)
    run_dir = tmp_path / "run"
    args = run_args(run_dir, shards, "wide.steps=0", f"wide.init={tmp_path / 'wide_hf'}",
                    "model.widen.attention_mult=1", f"imitate.init={tmp_path / 'thin_hf'}",
                    "imitate.init_head=random", "imitate.steps_per_point=2",
                    "imitate.optim.lr=1e-12", "eval_every=0")
    assert main(["-q", "wide", *args]) == 0
    assert main(["-q", "imitate", *args]) == 0
    x = batch([20, 11], t=20, seed=5)
    for stage, hf in (("wide", wide_hf), ("imitate", thin_hf)):
        saved = checkpoint.load(run_dir / stage / "model.pt")
        net = build_shape(type(build_thin(tiny()).shape)(**saved["meta"]["shape"]))
        net.load_state_dict(saved["state_dict"])
        logits_agree(net, hf, x)  # the teacher as given; the thin net from its HF start

    # A teacher that does not fit: one line naming the key and both shapes, exit 2.
    capsys.readouterr()
    bad = run_args(tmp_path / "bad", shards, "wide.steps=0", f"wide.init={tmp_path / 'wide_hf'}",
                   "model.widen.attention_mult=1", "model.widen.ffn_mult=2")
    assert main(["-q", "wide", *bad]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("gwtn: error:")]
    assert "wide.init:" in line and "has shape (256, 32)" in line and "(128, 32)" in line
    assert "Traceback" not in err


def test_the_teacher_cache_keys_a_folder_by_its_files(tmp_path):
    from gwtn_dist.config import load_config

    hf_bert(tmp_path / "hf")
    cfg = load_config(None, ["model.family=bert", "data.dataset=text",
                             f"wide.init={tmp_path / 'hf'}"])
    before = teacher_settings(cfg)["wide"]["init"]
    hf_bert(tmp_path / "hf", seed=1)  # other weights at the same path
    assert teacher_settings(cfg)["wide"]["init"] != before
