"""The PyTorch baselines: BitFit, full fine-tuning and head-only tuning, with the same
optimizer the bundle's optimizer model runs.

ORT's ``generate_artifacts(optimizer=OptimType.AdamW)`` builds ``AdamWOptimizer`` with
betas (0.9, 0.999), epsilon 1e-6, weight decay 0, bias correction on and ``adam_mode=1``
(Hugging Face AdamW: epsilon is added to sqrt(v) *before* the bias correction, which is
folded into the step size). ``torch.optim.AdamW`` adds epsilon after dividing sqrt(v) by
sqrt(1 - beta2^t); scaling its epsilon by 1/sqrt(1 - beta2^t) every step gives exactly the
HF update, so :func:`hf_adamw_epsilon` does that.

The models stay in eval mode (no dropout), as the bundle was exported.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    >>> opt = torch.optim.AdamW(net.parameters(), **ORT_ADAMW)
    >>> hf_adamw_epsilon(opt, step=1); round(opt.param_groups[0]["eps"] / 1e-6, 2)
    31.62
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Mode = Literal["bitfit", "full", "head"]
ORT_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}


def hf_adamw_epsilon(optimizer: torch.optim.Optimizer, step: int, eps: float = ORT_ADAMW["eps"]) -> None:
    """Set torch AdamW's epsilon for ``step`` (1-based) so it matches ORT's adam_mode=1."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    for group in optimizer.param_groups:
        group["eps"] = eps / float(np.sqrt(1.0 - beta2 ** step))


def trainable_names(model: torch.nn.Module, mode: Mode, bias_names: Iterable[str] | None = None) -> list[str]:
    """Which parameters a recipe trains: BitFit (the bundle's trainable set, else every
    ``*.bias``), everything, or the head (``head.*``)."""
    names = [n for n, _ in model.named_parameters()]
    if mode == "full":
        return names
    if mode == "head":
        return [n for n in names if n.startswith("head.")]
    wanted = set(bias_names) if bias_names is not None else {n for n in names if n == "bias" or n.endswith(".bias")}
    return [n for n in names if n in wanted]


class TorchTrainer:
    """One training recipe over a classifier whose ``forward(input_ids, attention_mask,
    token_type_ids)`` returns logits; trains ``model`` in place."""

    def __init__(self, model: torch.nn.Module, mode: Mode, lr: float, bias_names: Iterable[str] | None = None):
        self.model = model.eval()
        self.mode = mode
        self.names = trainable_names(model, mode, bias_names)
        wanted = set(self.names)
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
            if name in wanted:
                params.append(p)
        self.optimizer = torch.optim.AdamW(params, lr=lr, **ORT_ADAMW)
        self.steps = 0

    def step(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
        """One forward + backward + AdamW step; returns the batch loss."""
        self.steps += 1
        hf_adamw_epsilon(self.optimizer, self.steps)
        logits = self.model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        loss = F.cross_entropy(logits, torch.from_numpy(np.asarray(labels, np.int64)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}).numpy()


def train_head(head: torch.nn.Linear, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int,
               seed: int = 0, rng: np.random.Generator | None = None) -> None:
    """Train a Linear head in place on cached embeddings (AdamW, mini-batches, shuffled
    each epoch the way ``bitfit.sdk.data.batches`` shuffles)."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, **ORT_ADAMW)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            index = torch.from_numpy(order[start:start + batch_size])
            step += 1
            hf_adamw_epsilon(opt, step)
            loss = F.cross_entropy(head(xt[index]), yt[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
