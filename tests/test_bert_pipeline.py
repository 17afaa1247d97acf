"""BERT through the pipeline on CPU: text shards → wide → imitate → finetune (+ baselines),
held-out masked-LM metrics, `gwtn compare` for the family, padding left out of the losses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from gwtn_dist.kernels import select_imitation_mse

from gwtn_dist.cli import main
from gwtn_dist.config import load_config
from gwtn_dist.models.family import build_thin, build_wide
from gwtn_dist.stages.tasks import TextTask, attention_kl
from tests.conftest import REPO
from tests.test_bert import batch, tiny

NOUNS = {"king": ("old wise", "ruled"), "shepherd": ("poor young", "kept"),
         "river": ("deep wide", "flowed"), "city": ("great holy", "stood"),
         "house": ("small dark", "fell"), "field": ("green broad", "yielded"),
         "vine": ("fruitful tender", "grew"), "lamb": ("white meek", "slept")}


def generated_text(paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of 'the ADJ NOUN VERB by the ADJ NOUN.' where each noun has its own
    adjectives and verb, so the context predicts a masked word."""
    rng = random.Random(seed)
    nouns = sorted(NOUNS)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            a, b = rng.choice(nouns), rng.choice(nouns)
            sentences.append(f"the {rng.choice(NOUNS[a][0].split())} {a} {NOUNS[a][1]} by the "
                             f"{rng.choice(NOUNS[b][0].split())} {b}.")
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert-text")
    (folder / "corpus.txt").write_text(generated_text(600))
    assert main(["-q", "shards", "text", str(folder / "corpus.txt"), str(folder / "shards"),
                 "--seq-len", "32", "--vocab-size", "200", "--val-every", "10",
                 "--shard-size", "200"]) == 0
    return folder / "shards"


def run_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [str(REPO / "configs/bert_tiny_cpu.yaml"), f"run_dir={run_dir}",
            f"data.shards={shards}", "progress=false", *extra]


def test_tiny_bert_pretrains_through_all_stages(tmp_path, text_shards):
    run_dir = tmp_path / "run"
    assert main(["-q", "run", *run_args(run_dir, text_shards, "wide.steps=150",
                                        "wide.optim.lr=0.005")]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    val_tokens = None
    for stage, rec in summary.items():
        assert (run_dir / stage / "DONE").is_file()
        assert 0 <= rec["mlm_accuracy"] <= 1 and rec["perplexity"] > 1
        # Every stage is scored on the same masked tokens of the whole val split.
        val_tokens = val_tokens or rec["eval_tokens"]
        assert rec["eval_tokens"] == val_tokens > 0
    # Better than guessing uniformly over the 512-word vocabulary (perplexity 512) by far.
    assert summary["wide"]["perplexity"] < 40
    assert summary["finetune"]["perplexity"] < summary["imitate"]["perplexity"]
    imit = summary["imitate"]
    assert imit["points"] == ["layer.0", "layer.1"] and imit["head"] == "wide"
    assert summary["scratch"]["steps"] == imit["steps"] + summary["finetune"]["steps"]
    recs = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    for point in imit["points"]:
        losses = [r["loss"] for r in recs if r["point"] == point]
        assert sum(losses[-4:]) < sum(losses[:4]), point
    table = (run_dir / "results.md").read_text()
    assert "held-out MLM accuracy" in table and "thin from scratch" in table


def test_a_twin_with_a_wider_hidden_size_warms_up_the_thin_bert(tmp_path, text_shards):
    run_dir = tmp_path / "wider"
    assert main(["-q", "run", *run_args(run_dir, text_shards, "model.widen.boundary_mult=2",
                                        "imitate.target_norm=none", "baselines=[]",
                                        "eval_every=0")]) == 0
    imit = json.loads((run_dir / "imitate" / "stage.json").read_text())
    assert imit["bridges"] is True and imit["head"] == "random"
    recs = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    for point in imit["points"]:  # the lifted thin output approaches the 2×-wide output
        losses = [r["loss"] for r in recs if r["point"] == point]
        assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), point
    wide = torch.load(run_dir / "wide" / "model.pt", weights_only=False)
    thin = torch.load(run_dir / "finetune" / "model.pt", weights_only=False)
    assert wide["meta"]["shape"]["hidden"] == 64 and thin["meta"]["shape"]["hidden"] == 32
    # The thin net leaves imitation with exactly its own shape: nothing of the lifts is kept.
    reference = build_thin(load_config(REPO / "configs/bert_tiny_cpu.yaml").model).state_dict()
    assert {k: tuple(v.shape) for k, v in thin["state_dict"].items()} == {
        k: tuple(v.shape) for k, v in reference.items()}


def test_attention_transfer_and_compare_for_the_bert_family(tmp_path, text_shards):
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", *run_args(
        run_dir, text_shards, "wide.steps=20", "imitate.steps_per_point=4",
        "imitate.attention_weight=1.0", "finetune.label_steps=6", "finetune.kd_steps=2",
        "compare.seeds=[0]", "compare.deeper_layers=3", "eval_every=0")]) == 0
    table = json.loads((run_dir / "compare" / "compare.json").read_text())
    assert table["metric"] == "mlm_accuracy" and set(table["arms"]) == {
        "scratch", "kd", "win", "deeper"}
    for row in table["arms"].values():
        assert row["steps"] == 2 * 4 + 2 + 6 and row["perplexity"]["mean"] > 1
    assert table["arms"]["deeper"]["params"] > table["arms"]["scratch"]["params"]
    md = (run_dir / "compare" / "compare.md").read_text()
    assert "held-out MLM accuracy (mean ± sd)" in md and "perplexity (mean ± sd)" in md
    recs = [json.loads(line)
            for line in (run_dir / "compare" / "seed0" / "imitate" / "metrics.jsonl").open()]
    assert all(r["attention_kl"] >= 0 for r in recs)


def test_padded_tokens_count_in_no_imitation_loss():
    cfg = tiny()
    thin, wide = build_thin(cfg).eval(), build_wide(cfg).eval()
    task = TextTask(load_config(None, ["model.family=bert", "data.dataset=text"]))
    mse = select_imitation_mse("auto", torch.device("cpu"))
    x = batch([12, 6])
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][1, 6:] = 9  # what sits behind the padding mask
    losses, kls = [], []
    with torch.no_grad():
        for inp in (x, y):
            h, thin_maps = thin(inp, upto=2, attention=True)
            target, wide_maps = wide(inp, upto=2, attention=True)
            mask = task.feature_mask(inp)
            losses.append(mse(task.normalize(h), task.normalize(target), mask=mask))
            kls.append(attention_kl(wide_maps, thin_maps, mask))
        assert torch.allclose(losses[0], losses[1]) and torch.allclose(kls[0], kls[1])
        assert kls[0] > 0
        assert attention_kl(wide_maps, wide_maps, task.feature_mask(y)) == 0


def test_two_ranks_pretrain_bert_with_a_sharded_teacher(tmp_path, text_shards):
    from tests.test_distributed import run, torchrun

    run_dir = tmp_path / "dist"
    # Persistence threshold 0: ZeRO-3 partitions even these tiny parameters, so the wide net
    # (trained at ZeRO-3) and the teacher really are split, the tied decoder included.
    run(torchrun(2, ["run", *run_args(
        run_dir, text_shards, "threads=1", "eval_every=0", "wide.steps=10",
        "imitate.steps_per_point=3", "finetune.kd_steps=2", "finetune.label_steps=4",
        "dist.wide_zero_stage=3", "dist.teacher=shard", "dist.student_zero_stage=2",
        "model.widen.boundary_mult=2",  # the lifts train inside the thin net's ZeRO-2 engine
        "dist.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}")]))
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    assert summary["imitate"]["bridges"] is True
    teacher = summary["imitate"]["teacher"]
    assert teacher["mode"] == "shard" and teacher["world_size"] == 2
    assert teacher["param_bytes_per_rank"] * 2 == teacher["param_bytes_total"]
    assert all(rec["perplexity"] > 1 and rec["eval_tokens"] > 0 for rec in summary.values())


def test_a_crashed_bert_stage_resumes_to_the_same_weights(tmp_path, text_shards, monkeypatch):
    from gwtn_dist.stages import loop

    args = ["wide.steps=30", "checkpoint.every=10", "eval_every=0"]
    ref, run_dir = tmp_path / "ref", tmp_path / "crashed"
    assert main(["-q", "wide", *run_args(ref, text_shards, *args)]) == 0
    write, calls = loop.MetricsLog.write, []

    def crash_at_step_15(self, record):
        calls.append(record)
        if len(calls) == 15:
            raise RuntimeError("simulated crash")
        write(self, record)

    monkeypatch.setattr(loop.MetricsLog, "write", crash_at_step_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["-q", "wide", *run_args(run_dir, text_shards, *args)])
    monkeypatch.undo()
    # The stage continues from its step-10 checkpoint, token stream position included.
    assert main(["-q", "wide", *run_args(run_dir, text_shards, *args)]) == 0
    a = torch.load(ref / "wide" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(run_dir / "wide" / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((run_dir / "wide" / "metrics.jsonl").read_text().splitlines()) == 30
