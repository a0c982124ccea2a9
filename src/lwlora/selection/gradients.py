"""Gradient-based block scores: the paper's Fisher-information (FIM) baseline and a gradient-norm probe.

Both scores need the model *with its task head* (sequence classification or causal LM) and
labelled batches, unlike the representation scorers of :mod:`lwlora.selection.scoring`, which only read
block inputs and outputs. For block ``b`` with parameters ``θ_b``:

- ``fisher``: the summed diagonal of the empirical Fisher information,

  .. math:: F_b = \\frac{1}{N} \\sum_{n=1}^{N} \\lVert \\nabla_{\\theta_b} \\ell_n \\rVert_2^2,

  the mean over the ``N`` probe samples of the squared per-sample gradient norm of the model's own
  loss ``ℓ_n`` (labels as given, the *empirical* Fisher, not one sampled from the model's
  predictive distribution). With ``per_sample=True`` (the default) every batch is split and each
  sample gets its own forward/backward pass, so this is exact. With ``per_sample=False`` the
  per-batch gradient stands in for the per-sample ones, ``F_b ≈ Σ_k B_k ||∇ L_k||² / N`` over
  batches ``k`` of size ``B_k`` with mean loss ``L_k``: one pass per batch (faster), but an
  approximation — averaging inside a batch cancels part of the gradient noise, so the values
  are smaller and on a different scale; only compare them with each other.
- ``fisher_per_param``: ``F_b`` divided by the number of (floating-point) parameters of block
  ``b``, the mean Fisher diagonal entry.
- ``grad_norm``: the L2 norm over ``θ_b`` of the gradient of the mean loss over all probe
  samples. With ``per_sample=True`` it is the norm of the mean per-sample gradient (gradient of
  the mean over samples of ``ℓ_n``); with ``per_sample=False`` of the batch-size-weighted mean of
  the batch gradients. The two agree when the model's batch loss is a mean over samples
  (classification, regression); for a causal LM, whose batch loss averages over the *tokens* of
  the batch, they differ slightly (per sample, every sample weighs the same).

Normalisation. The paper ranks blocks by a Fisher-information baseline but does not say how the
per-parameter diagonal is reduced to one number per block; the likely reading (and the usual
one in FIM-based layer selection) is a plain sum or mean of the diagonal over the block's
parameters, which for blocks of equal shape — every block of a standard transformer — rank
identically. lwlora's documented default for ranking is ``fisher_per_param`` (the mean
diagonal entry): normalised by the parameter count so that, in stacks whose blocks differ in
width (e.g. hybrid or pruned models), a wide block does not win just because it has more
parameters to sum over. ``fisher`` (the sum) is returned too for comparison.

The model is used exactly as given (its weights, its loss): for the probe only the block
parameters require gradients (every other parameter is frozen for the duration, then every
``requires_grad`` flag is restored exactly), the model runs in eval mode (no dropout; each
module's ``training`` flag is restored afterwards), gradients are taken with
``torch.autograd.grad`` so no ``.grad`` is ever written to a parameter, and they are accumulated
in float32 (squared norms in float64) whatever the weights' dtype. A block the loss does not
depend on gets ``0.0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lwlora.blocks import BlockStack
from lwlora.selection.scoring import LayerScore

#: The ``GradientScores`` field lwlora ranks blocks by (see the module docstring).
DEFAULT_RANKING = "fisher_per_param"

#: Scorer names (``--scorer`` / ``--layers``) -> the ``GradientScores`` field they rank by.
GRADIENT_SCORERS = {"fim": DEFAULT_RANKING, "gradnorm": "grad_norm"}


@dataclass(frozen=True)
class GradientScores:
    """Per-block gradient scores, one entry per block of the stack, in block order."""

    fisher: list[float]  # mean over samples of the summed squared gradients of the block's parameters
    fisher_per_param: list[float]  # fisher / number of parameters in the block (the ranking default)
    grad_norm: list[float]  # L2 norm of the block's gradient of the mean loss over the probe
    num_params: list[int]
    num_samples: int


def _block_params(stack: BlockStack) -> list[list[nn.Parameter]]:
    """Each block's floating-point parameters, deduplicated (tied weights count once per block)."""
    result = []
    for block in stack.blocks:
        seen: set[int] = set()
        params = []
        for p in block.parameters():
            if id(p) in seen or not (p.is_floating_point() or p.is_complex()):
                continue
            seen.add(id(p))
            params.append(p)
        result.append(params)
    return result


def _input_device(model: nn.Module) -> torch.device:
    from lwlora.selection.capture import _input_device as input_device

    return input_device(model)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "labels", "inputs_embeds", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: the batch holds no tensor with a batch dimension")


def _split(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """One single-sample batch per sample: tensors whose first dimension is the batch are sliced."""
    return [
        {k: (v[i : i + 1] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == size else v) for k, v in batch.items()}
        for i in range(size)
    ]


def _grads(model: nn.Module, batch: Mapping[str, Any], flat: list[nn.Parameter]) -> tuple[list[Tensor | None], float]:
    """Gradients of ``model(**batch).loss`` w.r.t. ``flat`` (``None`` where unused), and the loss."""
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: the batches must carry 'labels' and the model a task head")
    if loss.ndim != 0:
        loss = loss.mean()
    if not loss.requires_grad:  # no block parameter reaches the loss
        return [None] * len(flat), float(loss.detach())
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    return list(grads), float(loss.detach())


def block_gradient_scores(
    model: nn.Module,
    stack: BlockStack,
    batches: Iterable[Mapping[str, Any]],
    *,
    per_sample: bool = True,
    progress: bool = False,
) -> GradientScores:
    """Empirical-Fisher and gradient-norm scores of every block of ``stack``.

    Args:
        model: the model that owns ``stack``, with its task head; ``model(**batch)`` must return
            ``.loss`` (batches carry ``labels``). Its weights and loss are used as given.
        stack: the block stack to score.
        batches: model inputs as made by a task's data collator (dicts of tensors, first
            dimension the batch); moved to the device of the input embeddings.
        per_sample: exact per-sample Fisher (one forward/backward per sample); ``False`` uses
            per-batch gradients instead (faster, an approximation on a different scale).
        progress: show a tqdm bar over batches.

    Returns:
        :class:`GradientScores`; rank by ``fisher_per_param`` (lwlora's default).

    Raises:
        ValueError: no samples, or a model without a loss.
    """
    from tqdm.auto import tqdm

    block_params = _block_params(stack)
    flat: list[nn.Parameter] = []
    owner: list[int] = []  # flat index -> block index
    for b, params in enumerate(block_params):
        flat.extend(params)
        owner.extend([b] * len(params))
    num_params = [sum(p.numel() for p in params) for params in block_params]
    num_blocks = len(block_params)

    device = _input_device(model)
    # every parameter's flag (the model's, and the block's should the stack lie outside the model)
    tracked = {id(p): p for p in list(model.parameters()) + flat}
    requires = [(p, p.requires_grad) for p in tracked.values()]
    modes = [(m, m.training) for m in model.modules()]

    sq_sums = [0.0] * num_blocks  # Σ (weight ·) ||g_b||², float64
    grad_sums: list[Tensor | None] = [None] * len(flat)  # Σ weight · g, float32
    num_samples = 0

    def accumulate(grads: list[Tensor | None], weight: float, sq_weight: float) -> None:
        per_block = [0.0] * num_blocks
        for j, g in enumerate(grads):
            if g is None:
                continue
            g32 = g.detach().to(torch.float32)
            per_block[owner[j]] += float(g32.to(torch.float64).pow(2).sum())
            if grad_sums[j] is None:
                grad_sums[j] = torch.zeros_like(g32)
            grad_sums[j].add_(g32, alpha=weight)
        for b in range(num_blocks):
            sq_sums[b] += sq_weight * per_block[b]

    try:
        for p, _ in requires:
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for batch in tqdm(batches, desc="block gradient scores", unit="batch", disable=not progress):
                batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
                size = _batch_size(batch)
                if size == 0:
                    continue
                if per_sample:
                    for sample in _split(batch, size):
                        grads, _ = _grads(model, sample, flat)
                        accumulate(grads, 1.0, 1.0)
                else:
                    grads, _ = _grads(model, batch, flat)
                    accumulate(grads, float(size), float(size))
                num_samples += size
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag

    if num_samples == 0:
        raise ValueError("no samples to score blocks on: the batches are empty")

    fisher = [s / num_samples for s in sq_sums]
    fisher_per_param = [f / n if n else math.nan for f, n in zip(fisher, num_params)]
    norm_sq = [0.0] * num_blocks
    for j, g in enumerate(grad_sums):
        if g is not None:
            norm_sq[owner[j]] += float((g.to(torch.float64) / num_samples).pow(2).sum())
    grad_norm = [math.sqrt(v) if math.isfinite(v) else math.nan for v in norm_sq]
    return GradientScores(
        fisher=fisher,
        fisher_per_param=fisher_per_param,
        grad_norm=grad_norm,
        num_params=num_params,
        num_samples=num_samples,
    )


def scores_to_layer_scores(values: list[float]) -> list[LayerScore]:
    """One :class:`LayerScore` per value: ``importance=value`` (no similarity); a non-finite value
    (NaN or inf, e.g. from a diverging loss) is degenerate with a reason and no importance."""
    scores = []
    for value in values:
        value = float(value)
        if math.isfinite(value):
            scores.append(LayerScore(similarity=None, importance=value))
        else:
            scores.append(
                LayerScore(similarity=None, importance=None, degenerate=True, reason=f"gradient score is not finite ({value})")
            )
    return scores



def gradient_selection(
    options: Any,
    model: nn.Module,
    stack: BlockStack,
    batches: Sequence[Mapping[str, Any]],
    *,
    model_kind: str,
    model_label: str,
    data_label: str | None,
    gguf_file: str | None = None,
    progress: bool = False,
) -> Any:
    """The selection by a gradient scorer (``options.scorer``: ``fim`` ranks by the per-parameter
    mean of the empirical Fisher diagonal, ``gradnorm`` by the gradient norm of the probe loss) on
    ``batches`` (labelled, e.g. :func:`lwlora.tasks.base.probe_batches`), chosen by the options'
    policy, as a :class:`~lwlora.selection.artifact.LayerSelection`. The raw Fisher values are
    kept in ``diagnostics``; fewer samples than ``options.num_samples`` is a warning."""
    import dataclasses
    import logging
    import time

    from lwlora.data import few_samples_warning
    from lwlora.selection.artifact import LayerRecord, rule_selection
    from lwlora.selection.capture import compute_placement
    from lwlora.selection.policy import select_blocks

    policy = options.policy_for(model_kind)
    started = time.perf_counter()
    device, dtype = compute_placement(model)
    scores = block_gradient_scores(model, stack, batches, progress=progress)
    values = getattr(scores, GRADIENT_SCORERS[options.scorer])
    layer_scores = scores_to_layer_scores(values)
    records = [LayerRecord(index=i, cka=None, similarity=None, importance=s.importance, degenerate=s.degenerate, reason=s.reason) for i, s in enumerate(layer_scores)]
    selected, warnings = select_blocks([r.importance for r in records], policy)
    few = few_samples_warning(options.num_samples, scores.num_samples, f"the training data of {data_label}")
    if few:
        warnings.insert(0, few)
    for message in warnings:
        logging.getLogger("lwlora").warning(message)
    base = rule_selection(options, stack, model_kind, selected, options.scorer, model_label=model_label, gguf_file=gguf_file)
    return dataclasses.replace(
        base,
        layers=records,
        num_samples=scores.num_samples,
        data=data_label,
        policy=policy.to_json(),
        warnings=warnings,
        diagnostics={"ranking": GRADIENT_SCORERS[options.scorer], "fisher": scores.fisher, "fisher_per_param": scores.fisher_per_param, "grad_norm": scores.grad_norm, "num_params": scores.num_params},
        device=device,
        dtype=dtype,
        timings={"score_s": round(time.perf_counter() - started, 4)},
    )
