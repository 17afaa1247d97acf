"""Text → token shards: wikitext cleaning, streamed dumps, bad pages, tokenizer, packing, MLM."""

from __future__ import annotations

import bz2
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gwtn_dist.data.documents import clean_wikitext, read_documents
from gwtn_dist.data.mlm import IGNORE, mask_tokens
from gwtn_dist.data.text_shards import Packer, split_of, write_text_shards
from gwtn_dist.data.tokenizer import SPECIALS, load_tokenizer, train_tokenizer

ARTICLE_1 = """{{Infobox animal|name={{nowrap|Red fox}}|image=Fox.jpg}}
The '''red fox''' is the largest of the [[true fox|true foxes]] and lives in the [[Northern
Hemisphere]].<ref name="a">{{cite book|title=Foxes}}</ref> It eats small [[rodent]]s.
[[File:Fox.jpg|thumb|A fox with a [[tail]]]]
== Diet ==
* Voles and mice<ref>Smith 2001</ref>
{| class="wikitable"
| cell || {{small|x}}
|}
The fox hunts at night &amp; rests by day.<!-- a comment -->
[[Category:Mammals]]"""
ARTICLE_2 = ("The grey wolf is a large canine. Wolves live in packs and hunt together. "
             "See [https://example.org the wolf site] for more about the wolf.")
ARTICLE_3 = "The brown bear eats fish, berries and roots. Bears sleep through the winter."


def page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text bytes="{len(text)}" xml:space="preserve">{esc}</text></revision></page>\n')


def make_dump(path: Path) -> Path:
    """A pages-articles dump: 3 articles, a redirect, a talk page, a non-UTF-8 page, a page
    that is only a template; bz2-compressed when the name ends in .bz2."""
    head = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
            "<siteinfo><sitename>Wikipedia</sitename></siteinfo>\n")
    body = (head + page("Red fox", ARTICLE_1) + page("Fox", "#REDIRECT [[Red fox]]", redirect=True)
            + page("Talk:Red fox", "Talk about foxes.", ns=1) + page("Grey wolf", ARTICLE_2)
            + page("Broken", "BROKEN") + page("Stub", "{{stub}}") + page("Brown bear", ARTICLE_3)
            + "</mediawiki>\n").encode()
    body = body.replace(b"BROKEN", b"caf\xe9 in latin-1, not UTF-8")
    path.write_bytes(bz2.compress(body) if path.suffix == ".bz2" else body)
    return path


def test_clean_wikitext_keeps_prose_and_drops_markup():
    text = clean_wikitext(ARTICLE_1)
    assert text.splitlines() == [
        "The red fox is the largest of the true foxes and lives in the Northern",
        "Hemisphere. It eats small rodents.",
        "Diet",
        "Voles and mice",
        "The fox hunts at night & rests by day.",
    ]
    assert clean_wikitext("a {{x|{{y|{{z}}}}}} b") == "a b"
    assert clean_wikitext('One<ref name="a/b" /> two<ref>x</ref> three.') == "One two three."
    assert clean_wikitext("[[Image:a.png|caption [[link]] more]]end") == "end"
    assert clean_wikitext("[http://x.org site] and [http://y.org]") == "site and"


@pytest.mark.parametrize("name", ["dump.xml", "dump.xml.bz2"])
def test_dump_is_streamed_and_bad_pages_are_counted(tmp_path, name):
    items = list(read_documents(make_dump(tmp_path / name)))
    reasons = [r for _, r in items]
    assert reasons == [None, "redirect", "not an article", None, "non-UTF-8 text", None, None]
    assert items[0][0] == ARTICLE_1 and items[3][0] == ARTICLE_2
    assert items[5][0] == "{{stub}}"  # empty only after cleaning: the writer counts it


def test_truncated_dump_keeps_the_pages_before_the_damage(tmp_path):
    data = make_dump(tmp_path / "d.xml").read_bytes()
    cut = data.index(b"<page><title>Grey wolf")
    (tmp_path / "cut.xml").write_bytes(data[: cut + 40])
    reasons = [r for _, r in read_documents(tmp_path / "cut.xml")]
    assert reasons == [None, "redirect", "not an article", "truncated or malformed input"]


def test_json_lines_skip_bad_lines(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_bytes(b'{"id": "1", "title": "Wolf", "text": "Wolves hunt."}\n'
                     b'{"text": "caf\xe9"}\n'
                     b"not json\n"
                     b'{"title": "no text"}\n\n'
                     b'{"text": "Bears sleep."}\n')
    assert list(read_documents(path)) == [
        ("Wolves hunt.", None), (None, "non-UTF-8 text"), (None, "bad JSON line"),
        (None, "no text field"), ("Bears sleep.", None)]


def test_extractor_files_are_recognised_by_content(tmp_path):
    (tmp_path / "wiki_00").write_bytes(b'{"id": "1", "text": "Wolves hunt."}\n')
    (tmp_path / "wiki_01").write_bytes(
        b'<doc id="1" url="u" title="Wolf">\nWolf\n\nWolves hunt in packs.\n</doc>\n'
        b'<doc id="2" url="u" title="Bad">\nBad\ncaf\xe9\n</doc>\n')
    (tmp_path / "dump").write_bytes(make_dump(tmp_path / "d.xml").read_bytes())
    assert list(read_documents(tmp_path / "wiki_00")) == [("Wolves hunt.", None)]
    assert list(read_documents(tmp_path / "wiki_01")) == [("Wolves hunt in packs.", None),
                                                         (None, "non-UTF-8 text")]
    assert [r for _, r in read_documents(tmp_path / "dump")][:2] == [None, "redirect"]


def test_truncated_bz2_text_is_counted_not_fatal(tmp_path):
    # Random letters do not compress away: the text spans several bz2 blocks.
    letters = np.random.default_rng(0).integers(97, 105, (30_000, 80), dtype=np.uint8)
    letters[:, -2:] = ord("\n")
    data = bz2.compress(b"One paragraph.\n\n" + letters.tobytes())
    (tmp_path / "t.txt.bz2").write_bytes(data[: len(data) * 3 // 4])
    items = list(read_documents(tmp_path / "t.txt.bz2"))
    assert items[0] == ("One paragraph.", None)
    assert items[-1] == (None, "truncated or malformed input")


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = [clean_wikitext(t) for t in (ARTICLE_1, ARTICLE_2, ARTICLE_3)] * 20
    a = train_tokenizer(lambda: texts, 150, tmp_path / "a.json")
    b = train_tokenizer(lambda: texts, 150)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    tok = load_tokenizer(tmp_path / "a.json")
    enc = tok.encode("The fox hunts [MASK].", add_special_tokens=False)
    assert "[MASK]" in enc.tokens and "[UNK]" not in enc.tokens
    assert tok.decode(tok.encode("the wolf").ids) == "the wolf"


def test_packer_fills_fixed_length_sequences():
    packer = Packer(6, cls_id=2, sep_id=3, pad_id=0, dtype=np.uint16)
    seqs = [*packer.add([10, 11, 12]), *packer.add([20, 21, 22, 23, 24, 25]), *packer.flush()]
    assert [s.tolist() for s in seqs] == [[2, 10, 11, 12, 3, 20], [2, 21, 22, 23, 24, 25],
                                          [2, 3, 0, 0, 0, 0]]
    assert all(s.dtype == np.uint16 for s in seqs)


def read_ids(out: Path, index: dict, split: str) -> list[np.ndarray]:
    seqs = []
    for name in index["splits"][split]["shards"]:
        with tarfile.open(out / name) as tf:
            seqs += [np.load(io.BytesIO(tf.extractfile(m).read())) for m in tf]
    return seqs


def test_wikipedia_shards_count_pages_and_tokens(tmp_path):
    dump = make_dump(tmp_path / "pages-articles.xml.bz2")
    out = tmp_path / "shards"
    index = write_text_shards([dump], out, seq_len=16, vocab_size=120, val_every=0,
                              maxcount=4, progress=False)
    train = index["splits"]["train"]
    assert train["skipped_by_reason"] == {"empty after cleaning": 1, "non-UTF-8 text": 1,
                                          "not an article": 1, "redirect": 1}
    seqs = read_ids(out, index, "train")
    assert len(seqs) == train["samples"] == sum(train["shard_samples"])
    assert all(s.shape == (16,) and s[0] == 2 for s in seqs)
    ids = np.concatenate(seqs)
    assert train["tokens"] == int((ids > 4).sum())  # text tokens: specials are ids 0-4
    assert int((ids == 3).sum()) == 3  # one [SEP] per kept article
    tok = load_tokenizer(out / "tokenizer.json")
    text = tok.decode(ids.tolist())
    assert "red fox" in text and "grey wolf" in text and "brown bear" in text
    assert "cite" not in text and "category" not in text


def test_parallel_text_writers_split_documents(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"t{i}.txt")
        files[-1].write_text("\n\n".join(f"Paragraph {i} {j} of the tale." for j in range(30)))
    one = write_text_shards(files, tmp_path / "one", seq_len=32, vocab_size=100,
                            val_every=10, progress=False)
    two = write_text_shards(files, tmp_path / "two", seq_len=32,
                            tokenizer=tmp_path / "one" / "tokenizer.json", val_every=10,
                            workers=2, progress=False)
    for split in ("train", "val"):
        assert one["splits"][split]["tokens"] == two["splits"][split]["tokens"] > 0
    assert one["splits"]["val"]["tokens"] < one["splits"]["train"]["tokens"] / 5
    assert {n.split("-")[1] for n in two["splits"]["train"]["shards"]} == {"w00", "w01"}


def test_val_and_test_splits_are_disjoint_whole_documents(tmp_path):
    """Every document lands whole in exactly one split, the one split_of names; a rewrite
    without a test split leaves no test shard behind."""
    import re

    from gwtn_dist.cli import main

    docs = 80
    (tmp_path / "c.txt").write_text("\n\n".join(
        f"doc {d} says the lamb slept by the river and the king ruled the city."
        for d in range(docs)))
    out = tmp_path / "s"
    # one in 3 to val, one in 4 to test, by a hash of the document's number.
    assert main(["-q", "shards", "text", str(tmp_path / "c.txt"), str(out), "--seq-len", "24",
                 "--vocab-size", "120", "--val-every", "3", "--test-every", "4",
                 "--shard-size", "7"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert set(index["splits"]) == {"train", "val", "test"} and index["test_every"] == 4
    tok = load_tokenizer(out / "tokenizer.json")
    found: dict[int, str] = {}
    for split in ("train", "val", "test"):
        ids = np.concatenate(read_ids(out, index, split))  # the split's (n·seq_len,) token stream
        for d in map(int, re.findall(r"doc (\d+) says", tok.decode(ids.tolist()))):
            assert d not in found, f"document {d} is in {found[d]} and {split}"
            found[d] = split
    assert sorted(found) == list(range(docs))  # every document, once
    assert all(found[d] == split_of(d, 3, 4) for d in found)
    assert {s for s in found.values()} == {"train", "val", "test"}
    # Written again without a test split: its old shards are cleared, the index has none.
    assert main(["-q", "shards", "text", str(tmp_path / "c.txt"), str(out), "--seq-len", "24",
                 "--tokenizer", str(out / "tokenizer.json"), "--val-every", "3",
                 "--test-every", "0"]) == 0
    assert "test" not in json.loads((out / "index.json").read_text())["splits"]
    assert not list(out.glob("test-*"))
    assert main(["shards", "text", str(tmp_path / "c.txt"), str(out), "--test-every", "1"]) == 2


def test_bible_kjv_corpus(tmp_path):
    """The real corpus named in the docs: Debian's bible-kjv."""
    if shutil.which("bible") is None:
        pytest.skip("the `bible` command is absent (apt-get install bible-kjv)")
    text = subprocess.run(["bible", "gen1:1-rev22:21"], check=True, capture_output=True).stdout
    (tmp_path / "kjv.txt").write_bytes(text)
    index = write_text_shards([tmp_path / "kjv.txt"], tmp_path / "s", seq_len=128,
                              vocab_size=4000, progress=False)
    train = index["splits"]["train"]
    assert train["skipped"] == 0 and index["vocab_size"] == 4000
    # About 790k words of English: between 0.8 and 1.5 WordPiece tokens per word.
    held_out = index["splits"]["val"]["tokens"] + index["splits"]["test"]["tokens"]
    assert 0.8 * 790_000 < train["tokens"] + held_out < 1.5 * 790_000


def test_masking_follows_bert_proportions():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (64, 512))
    ids[:, 0], ids[:, 100], ids[:, 400:] = 2, 3, 0  # [CLS], a [SEP], padding
    inputs, labels = mask_tokens(ids, np.random.default_rng(1), vocab_size=1000, mask_id=4,
                                 special_ids=[0, 1, 2, 3, 4])
    chosen = labels != IGNORE
    ordinary = ~np.isin(ids, [0, 1, 2, 3, 4])
    assert not chosen[~ordinary].any()  # specials and padding are never chosen
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.005
    assert np.array_equal(labels[chosen], ids[chosen])
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    n = chosen.sum()
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(swapped.sum() / n - 0.1) < 0.015  # (random = original happens 1 in 995)
    assert abs(kept.sum() / n - 0.1) < 0.015
    assert inputs[swapped].min() >= 5  # random replacements are ordinary tokens
    again, _ = mask_tokens(ids, np.random.default_rng(1), vocab_size=1000, mask_id=4,
                           special_ids=[0, 1, 2, 3, 4])
    assert np.array_equal(inputs, again)


def test_cli_text_shards_and_tokenizer(tmp_path):
    from gwtn_dist.cli import main

    (tmp_path / "a.txt").write_text("One fish two fish.\n\nRed fish blue fish.\n" * 20)
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--out",
                 str(tmp_path / "tok.json"), "--vocab-size", "60"]) == 0
    assert main(["-q", "shards", "text", str(tmp_path / "a.txt"), str(tmp_path / "s"),
                 "--tokenizer", str(tmp_path / "tok.json"), "--seq-len", "16"]) == 0
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] > 0
    assert (tmp_path / "s" / "tokenizer.json").read_text() == (tmp_path / "tok.json").read_text()
    assert main(["shards", "wikipedia", str(tmp_path / "missing.xml"), str(tmp_path / "w")]) == 2


def test_a_corpus_of_alternating_headings_and_chapters_gets_chapters_in_every_split():
    """The Bible as ``bible`` prints it alternates a heading ("Genesis 1") and its chapter; a
    period-based split sent every heading, and no chapter, to the test split. The hash-based one
    gives each split chapters in about its share."""
    docs = 2000
    chapters = {"train": 0, "val": 0, "test": 0}
    for d in range(1, docs, 2):  # odd numbers: the chapters
        chapters[split_of(d, 30, 30)] += 1
    for split in ("val", "test"):
        assert 0.5 * (docs / 2) / 30 < chapters[split] < 1.5 * (docs / 2) / 30, chapters
    assert {split_of(d, 30, 30) for d in range(docs)} == {"train", "val", "test"}
    assert all(split_of(d, 0, 0) == "train" for d in range(100))
