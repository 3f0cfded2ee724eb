"""The synthetic train-step batches every method is timed on, in numpy only, so the
torch-free device worker (``benchmarks.device_worker``) builds exactly the same arrays as
the main process.

Example:
    >>> from benchmarks.batches import random_batch
    >>> feeds, labels = random_batch(2, 5, vocab_size=30522, classes=3, seed=0)
    >>> feeds["input_ids"].shape, feeds["attention_mask"].sum(), labels.shape
    ((2, 5), np.int64(10), (2,))
"""

from __future__ import annotations

import numpy as np


def random_batch(batch: int, seq: int, *, vocab_size: int, classes: int, seed: int = 0,
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token ids of exactly ``seq`` positions per row (no padding) and random class labels."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 2)
    feeds = {
        "input_ids": rng.integers(low, vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return feeds, rng.integers(0, classes, batch).astype(np.int64)
