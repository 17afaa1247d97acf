"""BERT's dynamic masking for masked-LM pretraining, applied when a batch is loaded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = -100  # the label of unchosen positions; torch's cross-entropy ignores it by default


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], probability: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray]:
    """Choose each non-special token with ``probability``; of the chosen, 80% become ``mask_id``,
    10% a random non-special token, 10% stay. Specials (``[CLS]``, ``[SEP]``, ``[PAD]``, …) are
    never chosen.

    ids: integer (B, L). Returns ``(inputs, labels)``, both int64 (B, L); labels hold the
    original id where a token was chosen and ``-100`` elsewhere. Deterministic given ``rng``.
    """
    ids = ids.astype(np.int64)
    specials = np.asarray(sorted(special_ids), dtype=np.int64)
    chosen = (rng.random(ids.shape) < probability) & ~np.isin(ids, specials)
    labels = np.where(chosen, ids, IGNORE)
    action = rng.random(ids.shape)  # < 0.8: [MASK], 0.8–0.9: random token, ≥ 0.9: unchanged
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = mask_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    ordinary = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), specials)
    inputs[to_random] = ordinary[rng.integers(len(ordinary), size=int(to_random.sum()))]
    return inputs, labels
