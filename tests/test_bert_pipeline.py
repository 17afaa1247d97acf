"""BERT through the pipeline on CPU: text shards → wide → imitate → finetune (+ baselines),
masked-LM metrics on the val and test documents (and on old shards' one held-out split),
`gwtn compare` for the family, padding left out of the losses."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from gwtn_dist.kernels import select_imitation_mse

from gwtn_dist.cli import main
from gwtn_dist.config import load_config
from gwtn_dist.models.bert.task import TextTask, attention_kl
from gwtn_dist.models.family import build_thin, build_wide
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


def write_shards(folder: Path, test_every: int) -> Path:
    """600 generated paragraphs → token shards: val every 10th document, test every
    ``test_every``-th (0: none, the two-split shards written before the test split)."""
    (folder / "corpus.txt").write_text(generated_text(600))
    assert main(["-q", "shards", "text", str(folder / "corpus.txt"), str(folder / "shards"),
                 "--seq-len", "32", "--vocab-size", "200", "--val-every", "10",
                 "--test-every", str(test_every), "--shard-size", "200"]) == 0
    return folder / "shards"


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("bert-text"), test_every=10)


@pytest.fixture(scope="module")
def two_split_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("bert-text-old"), test_every=0)


def record_splits(monkeypatch) -> list[str | None]:
    """The split of every token stream opened from now on (None: training)."""
    from gwtn_dist.data import batches

    opened, real = [], batches.text_stream

    def text_stream(source, **kw):
        opened.append(kw.get("split"))
        return real(source, **kw)

    monkeypatch.setattr(batches, "text_stream", text_stream)
    return opened


def run_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [str(REPO / "configs/bert_tiny_cpu.yaml"), f"run_dir={run_dir}",
            f"data.shards={shards}", "progress=false", *extra]


def test_tiny_bert_pretrains_through_all_stages(tmp_path, text_shards):
    run_dir = tmp_path / "run"
    assert main(["-q", "run", *run_args(run_dir, text_shards, "wide.steps=150",
                                        "wide.optim.lr=0.005")]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    tokens = None
    for stage, rec in summary.items():
        assert (run_dir / stage / "DONE").is_file()
        assert 0 <= rec["mlm_accuracy"] <= 1 and rec["perplexity"] > 1
        assert 0 <= rec["val_mlm_accuracy"] <= 1 and rec["val_perplexity"] > 1
        # Scored on both held-out splits: different documents, so different numbers.
        assert rec["val_mlm_accuracy"] != rec["mlm_accuracy"]
        assert rec["val_perplexity"] != rec["perplexity"]
        # Every stage is scored on the same masked tokens of the whole val and test splits.
        tokens = tokens or (rec["val_eval_tokens"], rec["eval_tokens"])
        assert (rec["val_eval_tokens"], rec["eval_tokens"]) == tokens and min(tokens) > 0
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
    curve = [json.loads(line) for line in (run_dir / "wide" / "metrics.jsonl").open()]
    timed = [r for r in curve if "step_s" in r]
    max_len = load_config(REPO / "configs/bert_tiny_cpu.yaml").model.max_len
    assert timed and all(  # tokens/s: more than a token per sequence, at most max_len of them
        r["samples_per_s"] < r["tokens_per_s"] <= r["samples_per_s"] * max_len * 1.001
        for r in timed)
    assert any("val_mlm_accuracy" in r for r in curve)  # curves read val …
    assert not any("mlm_accuracy" in r for r in curve)  # … and never test
    table = (run_dir / "results.md").read_text()
    assert "val MLM accuracy" in table and "test MLM accuracy" in table
    assert "thin from scratch" in table


def test_a_twin_with_a_wider_hidden_size_warms_up_the_thin_bert(tmp_path, text_shards):
    run_dir = tmp_path / "wider"
    assert main(["-q", "run", *run_args(run_dir, text_shards, "model.widen.boundary_mult=2",
                                        "imitate.target_norm=none", "arms=[win]",
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


def test_parallel_imitation_warms_up_a_thin_bert_from_a_wider_twin(tmp_path, text_shards):
    # Wider hidden size: each layer starts from P⁺ · (the teacher's layer output below it);
    # attention transfer on, and a polish pass after the parallel phase.
    run_dir = tmp_path / "parallel"
    assert main(["-q", "run", *run_args(
        run_dir, text_shards, "model.widen.boundary_mult=2", "imitate.schedule=parallel",
        "imitate.parallel_polish_steps=3", "imitate.attention_weight=0.5", "arms=[win]",
        "eval_every=0", "wide.steps=40", "finetune.label_steps=10")]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    imit = summary["imitate"]
    assert imit["steps"] == 2 * 15 and imit["bridges"] is True  # the sequential budget
    assert set(imit["relative_error"]) == {"layer.0", "layer.1"}
    assert imit["perplexity"] > 1 and summary["finetune"]["perplexity"] > 1
    recs = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    par = [r for r in recs if r["point"] == "parallel"]
    assert len(par) == 2 * (15 - 3) and all(r["attention_kl"] >= 0 for r in par)
    for point in imit["points"]:
        errors = [r[f"rel_error/{point}"] for r in par]
        assert sum(errors[-4:]) < sum(errors[:4]), point


def test_attention_transfer_and_compare_for_the_bert_family(tmp_path, text_shards):
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", *run_args(
        run_dir, text_shards, "wide.steps=20", "imitate.steps_per_point=4",
        "imitate.attention_weight=1.0", "finetune.label_steps=6", "finetune.kd_steps=2",
        "compare.seeds=[0]", "compare.deeper_layers=3", "eval_every=0",
        "arms=[scratch,kd,win,deeper]")]) == 0
    table = json.loads((run_dir / "compare" / "compare.json").read_text())
    assert table["metric"] == "mlm_accuracy" and set(table["arms"]) == {
        "scratch", "kd", "win", "deeper"}
    assert table["select_metric"] == "val_mlm_accuracy" and table["separate_test"]
    for row in table["arms"].values():
        assert row["steps"] == 2 * 4 + 2 + 6 and row["perplexity"]["mean"] > 1
    assert table["arms"]["deeper"]["params"] > table["arms"]["scratch"]["params"]
    md = (run_dir / "compare" / "compare.md").read_text()
    assert "val MLM accuracy (mean ± sd)" in md and "test MLM accuracy (mean ± sd)" in md
    assert "test perplexity (mean ± sd)" in md
    assert "every choice is made on the token shards' val documents" in md
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


def test_a_tuning_run_never_opens_the_test_documents(tmp_path, text_shards, monkeypatch):
    opened = record_splits(monkeypatch)
    run_dir = tmp_path / "tune"
    assert main(["-q", "wide", *run_args(run_dir, text_shards, "wide.steps=10", "eval_every=5",
                                         "eval_test=false")]) == 0
    assert set(opened) == {None, "val"}  # training and the validation split only
    rec = json.loads((run_dir / "wide" / "stage.json").read_text())
    assert "val_mlm_accuracy" in rec and "mlm_accuracy" not in rec and "perplexity" not in rec


def test_two_split_shards_read_their_one_held_out_split_and_warn(tmp_path, two_split_shards,
                                                                 monkeypatch, caplog):
    from gwtn_dist.models.bert import task as tasks

    monkeypatch.setattr(tasks, "_warned_one_split", set())
    opened = record_splits(monkeypatch)
    run_dir = tmp_path / "old"
    with caplog.at_level(logging.WARNING, logger="gwtn"):
        assert main(["-q", "wide", *run_args(run_dir, two_split_shards, "wide.steps=10",
                                             "eval_every=5")]) == 0
    assert set(opened) == {None, "val"}  # the val shards, for curves and the score alike
    warnings = [r.getMessage() for r in caplog.records if "no test split" in r.getMessage()]
    assert len(warnings) == 1 and "--test-every" in warnings[0]
    rec = json.loads((run_dir / "wide" / "stage.json").read_text())
    assert 0 <= rec["mlm_accuracy"] <= 1 and rec["eval_tokens"] > 0
    assert not any(k.startswith("val_") for k in rec)  # today's names, one split
    curve = [json.loads(line) for line in (run_dir / "wide" / "metrics.jsonl").open()]
    assert any("mlm_accuracy" in r for r in curve)
    task = tasks.TextTask(load_config(REPO / "configs/bert_tiny_cpu.yaml",
                                      [f"data.shards={two_split_shards}"]))
    assert (task.select_metric, task.curve_split, task.score_splits) == (
        "mlm_accuracy", "test", ("test",))
    # A comparison on them chooses and reports on the one split, and says so.
    assert main(["-q", "compare", *run_args(
        tmp_path / "cmp", two_split_shards, "wide.steps=6", "imitate.steps_per_point=2",
        "finetune.label_steps=2", "arms=[scratch,win]", "compare.seeds=[0]",
        "eval_every=0")]) == 0
    table = json.loads((tmp_path / "cmp" / "compare" / "compare.json").read_text())
    assert table["select_metric"] == table["metric"] == "mlm_accuracy"
    assert not table["separate_test"]
    md = (tmp_path / "cmp" / "compare" / "compare.md").read_text()
    assert "one held-out split, read for every choice and for this report alike" in md
    assert "held-out MLM accuracy (mean ± sd)" in md and "val MLM" not in md


def test_a_teacher_cached_before_the_test_split_is_not_reused(tmp_path):
    """The cache keys on the shards' path; rewritten with a test split, the folder trains on
    fewer documents, so a teacher cached from the two-split shards must not be found."""
    from gwtn_dist.stages.teacher_cache import cache_dir

    shards = tmp_path / "shards"
    shards.mkdir()
    cfg = load_config(REPO / "configs/bert_tiny_cpu.yaml",
                      [f"data.shards={shards}", f"wide.cache={tmp_path / 'cache'}"])
    empty = {"shards": [], "shard_samples": []}  # a valid index (its shards do not matter)
    index = {"format": "tokens", "val_every": 10, "splits": {"train": empty, "val": empty}}
    (shards / "index.json").write_text(json.dumps(index))
    old = cache_dir(cfg)
    three = {**index, "test_every": 10, "splits": {**index["splits"], "test": empty}}
    (shards / "index.json").write_text(json.dumps(three))
    with_test = cache_dir(cfg)
    assert with_test != old
    # Rewritten by the hash rule at the same periods: other documents are held out.
    from gwtn_dist.data.text_shards import SPLIT_RULE
    (shards / "index.json").write_text(json.dumps({**three, "split_rule": SPLIT_RULE}))
    assert cache_dir(cfg) not in (old, with_test)
