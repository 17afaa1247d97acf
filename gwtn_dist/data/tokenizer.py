"""A BERT-style WordPiece tokenizer, trained deterministically with the ``tokenizers`` library.

The library's WordPiece trainer is not deterministic as such: it adds the ``##c`` continuation
symbols in hash-map order, and the merge queue breaks count ties by symbol id, so two runs on the
same text can learn different vocabularies. Declaring every ``##c`` up front (in sorted order,
after a first pass that collects the corpus alphabet) fixes all ids before training starts;
with ids fixed, the tie-breaks and so the whole vocabulary are the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from .errors import DataSourceError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    model = (models.WordPiece(vocab, unk_token="[UNK]") if vocab is not None
             else models.WordPiece(unk_token="[UNK]"))
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts: Callable[[], Iterable[str]], vocab_size: int,
                    out: Path | str | None = None, progress: bool = False) -> Tokenizer:
    """Train a WordPiece vocabulary of ``vocab_size`` on ``texts()`` (called twice: two passes).

    The result lowercases, splits like BERT, and has the ids ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]``
    2, ``[SEP]`` 3, ``[MASK]`` 4. Saved as JSON at ``out`` when given. Both passes run in this
    process: for a whole Wikipedia, train on a part of it and pass the result to the writer.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    alphabet: set[str] = set()
    for text in tqdm(texts(), desc="tokenizer: alphabet", unit="doc", disable=not progress,
                     mininterval=1.0):
        alphabet.update(normalizer.normalize_str(text))
    alphabet = sorted(c for c in alphabet if not c.isspace())
    if not alphabet:
        raise DataSourceError("no text to train a tokenizer on")
    continuation = ["##" + c for c in alphabet]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=progress,
                                        special_tokens=SPECIALS + continuation,
                                        initial_alphabet=alphabet)
    trained = _bert_tokenizer()
    trained.train_from_iterator(iter(texts()), trainer)
    # Rebuild with only the five real specials marked special: the ##c symbols were declared
    # special just to pin their ids and are ordinary vocabulary entries.
    tok = _bert_tokenizer(trained.get_vocab())
    tok.add_special_tokens(SPECIALS)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    return tok


def load_tokenizer(path: Path | str) -> Tokenizer:
    """A tokenizer saved by :func:`train_tokenizer`; checks it has the BERT special tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no tokenizer there; train one with `gwtn tokenizer train`")
    tok = Tokenizer.from_file(str(path))
    missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
    if missing:
        raise DataSourceError(f"{path}: tokenizer lacks the special tokens {missing}")
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"[PAD]": id, …}`` for the five BERT special tokens."""
    return {s: tok.token_to_id(s) for s in SPECIALS}
