"""Tiny torch models for export tests: small enough to export and validate in ~1 s each.

Every builder seeds torch itself, so two calls give the same weights, and returns
``(model, example_inputs)`` where ``example_inputs`` is the dict ``export_bundle`` takes.

Example:
    >>> model, inputs = mlp()
    >>> sorted(n for n, _ in model.named_parameters() if n.endswith("bias"))
    ['0.bias', '2.bias', '4.bias']
"""

from __future__ import annotations


import torch
from torch import nn

VOCAB = 100
SEQ = 6


def bias_names(model: nn.Module) -> list[str]:
    """Names of the parameters that are biases (``*.bias``), in ``named_parameters`` order."""
    return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]


def mlp(inputs: int = 4, hidden: int = 16, outputs: int = 3, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Linear -> ReLU -> Linear -> ReLU -> Linear over ``x: [2, inputs]``."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs),
    ).eval()
    return model, {"x": torch.randn(2, inputs)}


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + ReLU, twice, then global average pooling and a Linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(image)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def cnn(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """SmallCNN over ``image: [2, 3, 8, 8]``, with non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval(), {"image": torch.randn(2, 3, 8, 8)}


class LogitsOnly(nn.Module):
    """Wrap a Hugging Face model so ``forward`` takes positional tensors and returns logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def bert_config(num_labels: int = 3):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, attn_implementation="eager",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )


def text_inputs(batch: int = 2, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids in [5, VOCAB) and an attention mask whose last row is half padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_bert_classifier(num_labels: int = 3, seed: int = 0):
    """A 2-layer, 32-wide BertForSequenceClassification (eager attention) wrapped by LogitsOnly."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    inner = BertForSequenceClassification(bert_config(num_labels)).eval()
    return LogitsOnly(inner).eval(), text_inputs()


def tiny_bert_hf(num_labels: int = 3, seed: int = 0):
    """The unwrapped BertForSequenceClassification (for ``save_pretrained``)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels)).eval()


def save_tiny_bert_hf_dir(path):
    """Save ``tiny_bert_hf()`` (labels neg/neu/pos) with a WordLevel ``tokenizer.json`` to ``path``; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_bert_hf()
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(path)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(40)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return model


def tiny_gpt2(seed: int = 0):
    """A 2-layer, 32-wide GPT2LMHeadModel (eager attention): logits [batch, seq, VOCAB].

    Export it inside ``traceable_masks()``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        attn_implementation="eager", use_cache=False)
    inner = GPT2LMHeadModel(config).eval()
    return LogitsOnly(inner).eval(), text_inputs()


# export_bundle applies optimum's vmap-free masks itself; kept as a name for the tests.
from bitfit.export.sources import traceable_masks  # noqa: E402,F401


class ZeroBiasNet(nn.Module):
    """Four Linear layers of equal width whose biases are all zero (an exporter would merge them)."""

    def __init__(self, width: int = 8, classes: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)
        for layer in (self.a, self.b, self.c, self.out):
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def zero_bias_net(seed: int = 0):
    torch.manual_seed(seed)
    return ZeroBiasNet().eval(), {"x": torch.randn(2, 8)}


class NoBiasNet(nn.Module):
    """Two bias-free Linear layers: nothing for BitFit to train."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8, bias=False)
        self.b = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def distinct_bias_net(seed: int = 1):
    """ZeroBiasNet with random, distinct values everywhere, so a plain ONNX export keeps each bias."""
    model, inputs = zero_bias_net()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model, inputs


def no_bias_net(seed: int = 0):
    torch.manual_seed(seed)
    return NoBiasNet().eval(), {"x": torch.randn(2, 4)}


class TokenTagger(nn.Module):
    """Embedding -> Linear -> tanh -> Linear per token: logits [batch, seq, tags]."""

    def __init__(self, tags: int = 5, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.tag = nn.Linear(width, tags)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tag(self.norm(torch.tanh(self.hidden(self.embed(input_ids)))))


def token_tagger(seed: int = 0):
    torch.manual_seed(seed)
    return TokenTagger().eval(), {"input_ids": text_inputs()["input_ids"]}
