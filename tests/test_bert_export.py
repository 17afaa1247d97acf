"""Export round trip: Hugging Face's BertForMaskedLM loads the thin BERT and agrees on logits."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from gwtn_dist import checkpoint
from gwtn_dist.cli import main
from gwtn_dist.data.tokenizer import train_tokenizer
from gwtn_dist.export_hf import ExportError
from gwtn_dist.models.bert.export import export_model
from gwtn_dist.models.family import build_thin, build_wide, shape_meta
from tests.test_bert import batch, tiny

transformers = pytest.importorskip("transformers")


def trained_thin():
    """A thin BERT whose every parameter is off its init (LayerNorms, biases included)."""
    torch.manual_seed(0)
    net = build_thin(tiny())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_hugging_face_loads_the_export_and_gives_the_same_logits(tmp_path):
    net = trained_thin()
    out = tmp_path / "hf"
    export_model(net, out)
    hf = transformers.BertForMaskedLM.from_pretrained(out, attn_implementation="sdpa").eval()
    x = batch([12, 7, 3])  # padded rows
    with torch.no_grad():
        ours = net(x)
        theirs = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    real = x["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)
    assert (ours - theirs).abs().max() < 1e-4  # padded positions too


def test_gwtn_export_reads_a_stage_and_refuses_a_wide_twin(tmp_path):
    cfg = tiny()
    net = trained_thin()
    checkpoint.save_weights(net, tmp_path / "model.pt", {"stage": "finetune",
                                                         **shape_meta(cfg, wide=False)})
    tok = train_tokenizer(lambda: ["in the beginning god created the heaven and the earth"],
                          vocab_size=40, out=tmp_path / "tokenizer.json")
    assert main(["-q", "export", str(tmp_path / "model.pt"), str(tmp_path / "hf"),
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 32
    # safetensors is installed with transformers: the weights go there, not to a pickle.
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists()
    # The exported tokenizer wraps a sentence in [CLS] … [SEP] (the shards' one does not).
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert tok.encode("the earth").ids[0] != cls
    ids = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode("the earth").ids
    assert ids[0] == cls and ids[-1] == sep and len(ids) > 2
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("the earth")["input_ids"] == ids
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    x = batch([12, 9])
    with torch.no_grad():
        assert torch.allclose(net(x), hf(**x).logits, atol=1e-4)
    with pytest.raises(ExportError, match="heads × head_dim"):
        export_model(build_wide(cfg), tmp_path / "wide")
    # A wrong path or a tokenizer that is not one is a one-line CLI error (exit 2).
    assert main(["-q", "export", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert main(["-q", "export", str(tmp_path / "model.pt"), str(tmp_path / "x"),
                 "--tokenizer", str(tmp_path / "bad.json")]) == 2


def test_without_safetensors_the_weights_go_to_pytorch_model_bin(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "safetensors_available", lambda: False)
    net = trained_thin()
    files = export_model(net, tmp_path / "hf")
    assert [f.name for f in files] == ["config.json", "pytorch_model.bin"]
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    x = batch([12, 9])
    with torch.no_grad():
        assert torch.allclose(net(x), hf(**x).logits, atol=1e-4)
