"""Capture each transformer block's real input and output, pooled to one vector per sample.

Forward hooks on the blocks themselves read what each block receives and returns — not
``output_hidden_states``, whose last entry is taken after the final norm and so makes the last
block look important. The forward pass stops right after the last needed block (no final norm,
no LM head, no logits) by raising a private exception from that block's hook.

Pooling per sample, with the attention mask (1 = real token) so that left and right padding both
work:

- ``cls``: the first real token (the paper's choice for encoders);
- ``last``: the last real token (the paper's choice for decoders);
- ``mean``: the mean over real tokens.

Pooled vectors are float32 whatever the weights' dtype, gathered on the device of the input
embeddings, so models spread over several devices (``device_map="auto"``) work unchanged.

What is kept (``statistics``): the pooled (n, d) rows of every block, or — memory bounded in n —
only their linear-CKA statistics (:mod:`lwlora.streaming`, float64), from the first batch
(``covariance``) or from when the rows would outgrow them (``auto``, the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lwlora.blocks import BlockStack
from lwlora.streaming import CKAStatistics

POOLINGS: tuple[str, ...] = ("cls", "last", "mean")
#: What a capture keeps per block; see ``capture_block_representations(statistics=...)``.
STATISTICS: tuple[str, ...] = ("rows", "covariance", "auto")


class _StopForward(Exception):
    """Raised by the last needed block's hook to end the forward pass early."""


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """Pool token states to one vector per sample.

    Args:
        hidden: (B, T, D) token states, any float dtype.
        mask: (B, T) attention mask, nonzero for real tokens, or ``None`` (all tokens real).
        pooling: ``cls`` | ``last`` | ``mean``.

    Returns:
        (B, D) float32 tensor on ``hidden``'s device.
    """
    if hidden.ndim != 3:
        raise ValueError(f"expected block states of shape (batch, tokens, features), got {tuple(hidden.shape)}")
    batch, tokens, _ = hidden.shape
    if mask is None:
        real = torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device)
    else:
        if mask.shape != (batch, tokens):
            raise ValueError(
                f"attention mask of shape {tuple(mask.shape)} does not match block states {tuple(hidden.shape)}; "
                "this block does not see one token per input position"
            )
        real = mask.to(device=hidden.device).bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("a sample has no real (non-padding) token")
    rows = torch.arange(batch, device=hidden.device)
    # Pick the rows first and convert only them: converting all (B, T, D) states to fp32 would
    # cost as much memory traffic as a small layer.
    if pooling == "cls":
        first = real.int().argmax(dim=1)  # argmax returns the first maximal index
        return hidden[rows, first].float()
    if pooling == "last":
        last = tokens - 1 - real.flip(dims=[1]).int().argmax(dim=1)
        return hidden[rows, last].float()
    if pooling == "mean":
        weights = real.float().unsqueeze(1)  # (B, 1, T)
        summed = torch.bmm(weights, hidden.float()).squeeze(1)  # (B, 1, T) @ (B, T, D), in fp32
        return summed / real.sum(dim=1, keepdim=True).float()
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def _block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, Tensor) and value.is_floating_point() and value.ndim == 3:
            return value
    raise RuntimeError("could not find the hidden states among the block's inputs")


def _block_output(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    first = getattr(output, "last_hidden_state", None)
    if isinstance(first, Tensor):
        return first
    raise RuntimeError(f"could not find the hidden states in the block's output ({type(output).__name__})")


@dataclass
class BlockRepresentations:
    """Pooled block inputs and outputs: ``inputs[i]`` and ``outputs[i]`` are (n, d) float32
    matrices for block ``blocks[i]``, rows in sample order."""

    blocks: list[int]
    inputs: list[Tensor]
    outputs: list[Tensor]
    pooling: str = "last"
    #: the same blocks under other poolings captured in the same pass (``extra_poolings``)
    alternates: dict[str, "BlockRepresentations"] = field(default_factory=dict)
    #: what the capture kept (``statistics`` of :func:`capture_block_representations`)
    kept: ClassVar[str] = "rows"

    @property
    def num_samples(self) -> int:
        return self.inputs[0].shape[0] if self.inputs else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held, alternates included (numel × element size)."""
        own = sum(t.numel() * t.element_size() for t in (*self.inputs, *self.outputs))
        return own + sum(alt.nbytes for alt in self.alternates.values())

    def pair(self, index: int) -> tuple[Tensor, Tensor]:
        """Block ``blocks[index]``'s (input (n, d), output (n, d')) rows, for :func:`lwlora.selection.scoring.score_pair`."""
        return self.inputs[index], self.outputs[index]


@dataclass
class BlockStatistics:
    """Streamed linear-CKA statistics of pooled block inputs and outputs: ``statistics[i]``
    summarises block ``blocks[i]``'s (n, d) input and (n, d') output rows (see
    :mod:`lwlora.streaming`); the rows themselves are not kept."""

    blocks: list[int]
    statistics: list[CKAStatistics]
    pooling: str = "last"
    #: the same blocks under other poolings captured in the same pass (``extra_poolings``)
    alternates: dict[str, "BlockStatistics"] = field(default_factory=dict)
    kept: ClassVar[str] = "covariance"

    @property
    def num_samples(self) -> int:
        return self.statistics[0].count if self.statistics else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics held, alternates included (numel × element size)."""
        own = sum(stats.nbytes for stats in self.statistics)
        return own + sum(alt.nbytes for alt in self.alternates.values())

    def pair(self, index: int) -> CKAStatistics:
        """Block ``blocks[index]``'s statistics, for :func:`lwlora.selection.scoring.score_pair`."""
        return self.statistics[index]


#: What a capture returns: the rows, or their streamed statistics.
Captured = BlockRepresentations | BlockStatistics


class _BlockCollector:
    """One block's pooled (input, output) batches under one pooling: kept as rows, or absorbed
    into :class:`CKAStatistics` once ``streaming``."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.statistics: CKAStatistics | None = None
        self.pending: Tensor | None = None  # this batch's pooled input, until its output arrives
        self.batches = 0
        self.num_rows = 0
        self.rows_nbytes = 0

    def add(self, y: Tensor) -> None:
        """Take the batch's pooled output (b, d') with the pending pooled input (b, d)."""
        x, self.pending = self.pending, None
        assert x is not None, "the block's pre-hook did not run"
        self.batches += 1
        if not self.streaming:
            self.inputs.append(x)
            self.outputs.append(y)
            self.num_rows += x.shape[0]
            self.rows_nbytes += x.numel() * x.element_size() + y.numel() * y.element_size()
        elif self.statistics is None:
            self.statistics = CKAStatistics.from_rows(x, y)
        else:
            self.statistics.update(x, y)

    def statistics_nbytes(self) -> int:
        """Bytes the statistics of this block's widths take (a prediction before folding)."""
        if not self.inputs:
            return 0
        return CKAStatistics.state_nbytes(self.inputs[0].shape[1], self.outputs[0].shape[1])

    def fold(self) -> None:
        """Replace the kept rows by their statistics and stream from now on."""
        if self.inputs:
            self.statistics = CKAStatistics.empty(self.inputs[0].shape[1], self.outputs[0].shape[1], device=self.inputs[0].device)
            while self.inputs:  # batch by batch, each freed once absorbed (sums are order-free)
                self.statistics.update(self.inputs.pop(), self.outputs.pop())
        self.streaming = True
        self.num_rows = self.rows_nbytes = 0


def _should_fold(collectors: list[_BlockCollector], fold_at: int | None) -> bool:
    """``auto``: fold once the kept rows exceed ``fold_at`` samples, or (default) once they take
    more bytes than the statistics would: Σ 4 n (d + d') > Σ 8 (d² + d'² + d' d + d + d') over
    the blocks (float32 rows, float64 statistics), i.e. n > ~3 d for blocks of one width d."""
    if fold_at is not None:
        return collectors[0].num_rows > fold_at
    return sum(c.rows_nbytes for c in collectors) > sum(c.statistics_nbytes() for c in collectors)


def capture_block_representations(
    model: nn.Module,
    stack: BlockStack,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    pooling: str,
    blocks: Sequence[int] | None = None,
    mask_key: str | None = "attention_mask",
    progress: bool = True,
    total: int | None = None,
    extra_poolings: Sequence[str] = (),
    statistics: str = "auto",
    fold_at: int | None = None,
    split_at: Sequence[nn.Module] | None = None,
) -> Captured:
    """Run ``model`` over ``batches`` and pool every selected block's input and output.

    Args:
        model: the model that owns ``stack``; called as ``model(**batch)`` in eval mode, under
            ``torch.inference_mode``. Batches are moved to the device of the input embeddings.
        stack: the block stack to read.
        batches: model inputs, each with ``mask_key`` ((B, T), 1 for real tokens) when padded.
        mask_key: the batch key of the mask, or ``None``: every token is real (a vision tower's
            patch tokens, which the text attention mask does not describe).
        pooling: ``cls`` | ``last`` | ``mean``.
        blocks: block indices to read (default: all). The forward pass stops after the last one.
        progress: show a tqdm bar over batches.
        total: number of batches, for the progress bar.
        extra_poolings: further poolings to capture in the same pass (``result.alternates``).
        statistics: what is kept per block (:data:`STATISTICS`): ``rows`` — the pooled rows;
            ``covariance`` — only their linear-CKA statistics (:class:`CKAStatistics`, O(d²)
            whatever n), streamed from the first batch; ``auto`` — the rows until, after some
            batch, they take more memory than the statistics would, then every block's rows are
            folded into statistics and the rest is streamed. Memory is then bounded by the
            smaller of the two (plus one batch), independent of n. Only plain linear CKA can be
            computed from statistics (:func:`lwlora.selection.scoring.uses_statistics`).
        fold_at: ``auto`` only: fold once more than this many samples are kept, instead of when
            the rows outgrow the statistics (for tests and benchmarks).
        split_at: one module per block of ``stack`` whose input is the residual stream between
            the block's attention and MLP halves (:func:`lwlora.selection.units.mlp_entries`). Each block
            then yields two pairs, unit ``2 i`` (block input, that module's input) and unit
            ``2 i + 1`` (that module's input, block output); the result's ``blocks`` are unit ids.

    Returns:
        :class:`BlockRepresentations` with (n, d) float32 matrices per block, or
        :class:`BlockStatistics` (float64) when the rows were folded or never kept.
    """
    from tqdm.auto import tqdm

    poolings = list(dict.fromkeys([pooling, *extra_poolings]))
    for name in poolings:
        if name not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {name!r}")
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {', '.join(STATISTICS)}, got {statistics!r}")
    indices = sorted(set(range(stack.num_layers) if blocks is None else blocks))
    if not indices or indices[0] < 0 or indices[-1] >= stack.num_layers:
        raise ValueError(f"block indices must lie in [0, {stack.num_layers}), got {list(blocks or [])}")
    last_needed = indices[-1]
    if split_at is not None and len(split_at) != stack.num_layers:
        raise ValueError(f"split_at needs one module per block ({stack.num_layers}), got {len(split_at)}")
    # a pair per block (its input, its output), or per unit (2 i: input -> mid, 2 i + 1: mid -> output)
    first_pair = {i: 2 * i if split_at is not None else i for i in indices}
    last_pair = {i: 2 * i + 1 if split_at is not None else i for i in indices}
    pairs = sorted({*first_pair.values(), *last_pair.values()})
    collectors = {p: {u: _BlockCollector(streaming=statistics == "covariance") for u in pairs} for p in poolings}
    all_collectors = [c for per_block in collectors.values() for c in per_block.values()]
    current_mask: list[Tensor | None] = [None]

    def pre_hook(index: int):
        def hook(_module, args, kwargs):
            hidden = _block_input(args, kwargs)
            for name in poolings:
                collectors[name][first_pair[index]].pending = pool(hidden, current_mask[0], name).to(device)
        return hook

    def mid_hook(index: int):
        def hook(_module, args, kwargs):
            hidden = _block_input(args, kwargs)
            for name in poolings:
                pooled = pool(hidden, current_mask[0], name).to(device)
                collectors[name][2 * index].add(pooled)
                collectors[name][2 * index + 1].pending = pooled
        return hook

    def post_hook(index: int):
        def hook(_module, _args, _kwargs, output):
            hidden = _block_output(output)
            for name in poolings:
                collectors[name][last_pair[index]].add(pool(hidden, current_mask[0], name).to(device))
            if index == last_needed:
                raise _StopForward
        return hook

    # Pooled vectors are gathered on the input device: with device_map="auto" a block's input and
    # output can sit on different GPUs (accelerate moves inputs inside the block's forward).
    device = _input_device(model)
    handles = []
    for index in indices:
        block = stack.blocks[index]
        handles.append(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(index), with_kwargs=True))
        if split_at is not None:
            handles.append(split_at[index].register_forward_pre_hook(mid_hook(index), with_kwargs=True))

    was_training = model.training
    model.eval()
    last = collectors[pooling][last_pair[last_needed]]
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, total=total, desc="capturing block representations", unit="batch", disable=not progress):
                batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
                current_mask[0] = batch.get(mask_key) if mask_key is not None else None
                expected = last.batches + 1
                try:
                    model(**batch)
                except _StopForward:
                    pass
                if last.batches != expected:
                    raise RuntimeError(
                        f"block {last_needed} of {stack.path} did not run during the forward pass; "
                        "the inputs do not reach this stack (e.g. a vision tower without images)"
                    )
                if statistics == "auto" and not last.streaming and _should_fold(all_collectors, fold_at):
                    for collector in all_collectors:
                        collector.fold()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    def assemble(name: str) -> Captured:
        per_block = [collectors[name][u] for u in pairs]
        if last.streaming:
            return BlockStatistics(blocks=pairs, statistics=[c.statistics for c in per_block], pooling=name)
        return BlockRepresentations(blocks=pairs, inputs=[torch.cat(c.inputs) for c in per_block], outputs=[torch.cat(c.outputs) for c in per_block], pooling=name)

    result = assemble(pooling)
    result.alternates = {name: assemble(name) for name in poolings if name != pooling}
    return result


def _input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (the first parameter's device otherwise;
    never ``meta``, which accelerate uses for offloaded weights)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None) if embeddings is not None else None
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def compute_placement(model: nn.Module) -> tuple[str, str]:
    """(device, dtype) a capture on ``model`` runs in, as recorded in ``selection.json``.

    device: the input device, or every device of a model spread over several
    (``"cuda:0,cuda:1"``); dtype: the weights' dtype, or the autocast dtype in force over them
    (``"bfloat16 (autocast over float32 weights)"``)."""
    devices = sorted({str(p.device) for p in model.parameters() if p.device.type != "meta"}) or [str(_input_device(model))]
    device = devices[0] if len(devices) == 1 else ",".join(devices)
    first = _input_device(model)
    weights = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)).removeprefix("torch.")
    kind = first.type
    if kind in ("cpu", "cuda", "mps") and torch.is_autocast_enabled(kind):
        autocast = str(torch.get_autocast_dtype(kind)).removeprefix("torch.")
        return device, f"{autocast} (autocast over {weights} weights)"
    return device, weights
