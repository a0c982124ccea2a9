"""Model inputs from text samples: length-ordered, padded batches of only the keys the model takes."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lwlora.data import TextSamples


def forward_keys(model: nn.Module) -> set[str] | None:
    """The keyword arguments ``model.forward`` accepts, or None when it takes ``**kwargs`` (then
    every tokenizer output is passed)."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def make_batches(tokenizer: Any, samples: TextSamples, *, batch_size: int, max_length: int, model: nn.Module | None = None) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Tokenized, padded batches in length order (less padding), and the sample order used.

    Returns:
        (batches, order) where row j of the concatenated batches is sample ``order[j]``.
    """
    lengths = [len(ids) for ids in tokenizer(samples.texts, samples.text_pairs, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))
    accepted = forward_keys(model) if model is not None else None
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = [samples.texts[i] for i in chunk]
        pairs = [samples.text_pairs[i] for i in chunk] if samples.text_pairs is not None else None
        encoded = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in encoded.items() if accepted is None or k in accepted}
        batches.append(batch)
    return batches, order
