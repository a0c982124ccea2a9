"""Gradient-based block scores (empirical Fisher, gradient norm) against an independent autograd
reference on a toy model, and their sanity on tiny random BERT / Llama models."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES
from torch import nn

from lwlora.blocks import resolve_block_stack
from lwlora.selection.gradients import GradientScores, block_gradient_scores, scores_to_layer_scores

VOCAB, DIM, CLASSES = 20, 6, 3


class ToyBlock(nn.Module):
    def __init__(self, dim: int, detached: bool = False):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.detached = detached  # its update is cut from the graph: the loss does not depend on its weights

    def forward(self, h):
        update = torch.tanh(self.lin(h))
        return h + (update.detach() if self.detached else update)


class ToyModel(nn.Module):
    def __init__(self, detached_block: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(ToyBlock(DIM, detached=i == detached_block) for i in range(3))
        self.drop = nn.Dropout(0.5)  # must be off during scoring (eval mode)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, input_ids, labels=None, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.drop(h.mean(dim=1)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def toy(detached_block: int | None = None, seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(detached_block)


def toy_batches(sizes=(3, 4, 2), seq: int = 5, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, VOCAB, (b, seq), generator=g), "labels": torch.randint(0, CLASSES, (b,), generator=g)}
        for b in sizes
    ]


def reference(model: ToyModel, batches) -> dict[str, list[float]]:
    """Independent float64 computation with torch.autograd.grad, one sample at a time."""
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    params = [list(b.parameters()) for b in ref.blocks]
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    n = len(ids)

    def block_grads(loss):
        flat = [p for ps in params for p in ps]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        out, i = [], 0
        for ps in params:
            gs = grads[i : i + len(ps)]
            i += len(ps)
            out.append([torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)])
        return out

    fisher = [0.0] * 3
    for i in range(n):
        for b, gs in enumerate(block_grads(ref(ids[i : i + 1], labels[i : i + 1]).loss)):
            fisher[b] += sum(float((g**2).sum()) for g in gs) / n
    mean_grads = block_grads(ref(ids, labels).loss)  # cross entropy: mean over all n samples
    grad_norm = [math.sqrt(sum(float((g**2).sum()) for g in gs)) for gs in mean_grads]
    batch_fisher = [0.0] * 3  # the per_sample=False approximation: Σ_k B_k ||∇ L_k||² / N
    for batch in batches:
        size = len(batch["labels"])
        for b, gs in enumerate(block_grads(ref(batch["input_ids"], batch["labels"]).loss)):
            batch_fisher[b] += size * sum(float((g**2).sum()) for g in gs) / n
    num_params = [sum(p.numel() for p in ps) for ps in params]
    return {"fisher": fisher, "grad_norm": grad_norm, "batch_fisher": batch_fisher, "num_params": num_params}


def test_toy_matches_autograd_reference():
    model, batches = toy(), toy_batches()
    stack = resolve_block_stack(model)
    assert stack.path == "blocks"
    ref = reference(model, batches)
    scores = block_gradient_scores(model, stack, batches)
    assert isinstance(scores, GradientScores)
    assert scores.num_samples == 9
    assert scores.num_params == ref["num_params"] == [DIM * DIM + DIM] * 3
    assert scores.fisher == pytest.approx(ref["fisher"], rel=1e-4)
    assert scores.fisher_per_param == pytest.approx([f / n for f, n in zip(ref["fisher"], ref["num_params"])], rel=1e-4)
    assert scores.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert all(v > 0 for v in scores.fisher + scores.grad_norm)


def test_toy_per_batch_approximation():
    model, batches = toy(), toy_batches()
    stack = resolve_block_stack(model)
    ref = reference(model, batches)
    exact = block_gradient_scores(model, stack, batches, per_sample=True)
    approx = block_gradient_scores(model, stack, batches, per_sample=False)
    assert approx.num_samples == exact.num_samples == 9
    assert approx.fisher == pytest.approx(ref["batch_fisher"], rel=1e-4)
    for a, e in zip(approx.fisher, exact.fisher):
        assert not math.isclose(a, e, rel_tol=1e-3)  # differ in general ...
    # ... while the gradient of the mean loss is the same (the toy's loss is a mean over samples)
    assert approx.grad_norm == pytest.approx(exact.grad_norm, rel=1e-4)


def test_batching_does_not_change_per_sample_scores():
    model = toy()
    stack = resolve_block_stack(model)
    a = block_gradient_scores(model, stack, toy_batches(sizes=(3, 4, 2)))
    merged = toy_batches(sizes=(3, 4, 2))
    one = [{k: torch.cat([b[k] for b in merged]) for k in merged[0]}]
    b = block_gradient_scores(model, stack, one)
    assert a.fisher == pytest.approx(b.fisher, rel=1e-5)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


@pytest.mark.parametrize("per_sample", [True, False])
def test_block_the_loss_ignores_scores_zero(per_sample):
    model = toy(detached_block=1)
    scores = block_gradient_scores(model, resolve_block_stack(model), toy_batches(), per_sample=per_sample)
    assert scores.fisher[1] == scores.fisher_per_param[1] == scores.grad_norm[1] == 0.0
    assert scores.fisher[0] > 0 and scores.fisher[2] > 0 and scores.grad_norm[0] > 0


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("setup", ["all_trainable", "all_frozen", "partly_trainable_head"])
def test_flags_modes_and_grads_restored(setup):
    model = toy()
    if setup != "all_trainable":
        for p in model.parameters():
            p.requires_grad_(False)
    if setup == "partly_trainable_head":
        model.head.weight.requires_grad_(True)  # bias stays frozen
    model.train()
    model.blocks[0].eval()  # a mixed training state must come back exactly too
    before_flags = _flags(model)
    before_modes = {name: m.training for name, m in model.named_modules()}
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}

    scores = block_gradient_scores(model, resolve_block_stack(model), toy_batches())

    assert _flags(model) == before_flags
    assert {name: m.training for name, m in model.named_modules()} == before_modes
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_weights.items())
    # frozen or not, the scores are the same (and dropout was off: equal to the eval-mode reference)
    assert scores.fisher == pytest.approx(reference(model, toy_batches())["fisher"], rel=1e-4)


def test_flags_restored_when_the_forward_fails():
    model = toy()
    for p in model.parameters():
        p.requires_grad_(False)
    bad = [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]  # no labels: no loss
    with pytest.raises(ValueError, match="no loss"):
        block_gradient_scores(model, resolve_block_stack(model), bad)
    assert not any(p.requires_grad for p in model.parameters())


def test_empty_probe_is_an_error():
    model = toy()
    with pytest.raises(ValueError, match="no samples"):
        block_gradient_scores(model, resolve_block_stack(model), [])


def test_scores_to_layer_scores():
    scores = scores_to_layer_scores([0.5, float("nan"), 0.0, float("inf")])
    assert [s.importance for s in scores[::2]] == [0.5, 0.0]
    assert all(s.similarity is None for s in scores)
    assert [s.degenerate for s in scores] == [False, True, False, True]
    assert scores[1].importance is None and "not finite" in scores[1].reason
    assert scores[0].reason is None


# --- tiny transformers models ---------------------------------------------------------------


def _bert_batches(directory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    batches = []
    for start in (0, 4):
        texts = SENTENCES[start : start + 4]
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([i % 2 for i in range(start, start + 4)])
        batches.append(batch)
    return batches


def _llama_batches(directory):
    from transformers import AutoTokenizer

    from lwlora.tasks.base import CausalLMCollator, ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ensure_pad_token(tokenizer)
    collate = CausalLMCollator(tokenizer.pad_token_id)
    features = [dict(tokenizer(s)) for s in SENTENCES[:6]]
    return [collate(features[:3]), collate(features[3:])]


def _check_transformers_scores(model, batches, num_blocks):
    stack = resolve_block_stack(model)
    assert stack.num_layers == num_blocks
    flags = _flags(model)
    first = block_gradient_scores(model, stack, batches)
    second = block_gradient_scores(model, stack, batches)
    assert first == second  # deterministic
    for values in (first.fisher, first.fisher_per_param, first.grad_norm):
        assert len(values) == num_blocks
        assert all(math.isfinite(v) and v >= 0 for v in values)
    assert all(v > 0 for v in first.fisher)
    assert first.num_samples == sum(len(b["input_ids"]) for b in batches)
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(ls.degenerate for ls in scores_to_layer_scores(first.fisher_per_param))
    return stack, first


def test_tiny_bert_classification(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model.train()  # scoring must switch dropout off and then restore this
    batches = _bert_batches(tiny_bert_dir)
    stack, exact = _check_transformers_scores(model, batches, 3)
    assert model.training
    # classification loss is a mean over samples: per-batch and per-sample grad_norm agree
    approx = block_gradient_scores(model, stack, batches, per_sample=False)
    assert approx.grad_norm == pytest.approx(exact.grad_norm, rel=1e-3)
    assert approx.fisher != pytest.approx(exact.fisher, rel=1e-3)


def test_tiny_llama_causal_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)  # e.g. a frozen base model: stays frozen
    _check_transformers_scores(model, _llama_batches(tiny_llama_dir), 4)
    assert not any(p.requires_grad for p in model.parameters())
