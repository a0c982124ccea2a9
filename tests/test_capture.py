"""Pooling, padding sides, dtypes and sample order of the capture path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, LlamaConfig

from lwlora.blocks import resolve_block_stack
from lwlora.selection.capture import capture_block_representations, pool
from lwlora.data import TextSamples
from lwlora.selection.scoring import get_scorer
from lwlora.selection.pipeline import score_layers


def test_pool_against_manual_indexing():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "cls"), hidden[[0, 1], [0, 0]])
    torch.testing.assert_close(pool(hidden, right, "last"), hidden[[0, 1], [2, 4]])
    torch.testing.assert_close(pool(hidden, left, "cls"), hidden[[0, 1], [2, 0]])
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[[0, 1], [4, 4]])
    torch.testing.assert_close(pool(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))
    assert pool(hidden.bfloat16(), right, "mean").dtype == torch.float32


def test_pool_rejects_bad_input():
    hidden = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="no real"):
        pool(hidden, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), "last")
    with pytest.raises(ValueError, match="does not match"):
        pool(hidden, torch.ones(2, 5), "last")
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, None, "max")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return AutoModel.from_config(config).eval()


def _padded(sequences, side):
    width = max(len(s) for s in sequences)
    ids, mask = [], []
    for seq in sequences:
        pad = [0] * (width - len(seq))
        ids.append(pad + seq if side == "left" else seq + pad)
        mask.append([0] * len(pad) + [1] * len(seq) if side == "left" else [1] * len(seq) + [0] * len(pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
def test_left_and_right_padding_give_the_same_vectors(tiny_llama, pooling):
    sequences = [[5, 9, 11, 3], [7, 8], [20, 21, 22, 23, 24, 25], [40]]
    stack = resolve_block_stack(tiny_llama)
    reps = {
        side: capture_block_representations(tiny_llama, stack, [_padded(sequences, side)], pooling=pooling, progress=False)
        for side in ("left", "right")
    }
    unpadded = capture_block_representations(tiny_llama, stack, [{"input_ids": torch.tensor([s])} for s in sequences], pooling=pooling, mask_key="none", progress=False)
    for i in range(stack.num_layers):
        torch.testing.assert_close(reps["left"].outputs[i], reps["right"].outputs[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reps["left"].outputs[i], unpadded.outputs[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reps["left"].inputs[i], unpadded.inputs[i], rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_keep_float32_statistics(tiny_llama):
    import copy

    stack = resolve_block_stack(tiny_llama)
    batch = _padded([[5, 9, 11, 3, 4, 6], [7, 8, 9], [20, 21, 22, 23], [40, 41, 42, 43, 44], [1, 2, 3], [9, 9, 8, 7]], "right")
    fp32 = capture_block_representations(tiny_llama, stack, [batch], pooling="mean", progress=False)
    model16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    bf16 = capture_block_representations(model16, resolve_block_stack(model16), [batch], pooling="mean", progress=False)
    cka = get_scorer("cka")
    for i in range(stack.num_layers):
        assert bf16.outputs[i].dtype == torch.float32
        assert cka(bf16.inputs[i], bf16.outputs[i]).similarity == pytest.approx(cka(fp32.inputs[i], fp32.outputs[i]).similarity, abs=2e-2)


def test_early_stop_skips_later_blocks(tiny_llama):
    stack = resolve_block_stack(tiny_llama)
    calls = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(stack.blocks)]
    handles.append(tiny_llama.norm.register_forward_hook(lambda m, a, o: calls.append("norm")))
    try:
        capture_block_representations(tiny_llama, stack, [_padded([[1, 2, 3]], "right")], pooling="last", blocks=[0], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0]


class _CharTokenizer:
    """Just enough of a tokenizer for score_layers: one id per character, right padding."""

    def __call__(self, texts, pairs=None, padding=False, truncation=False, max_length=None, return_tensors=None):
        ids = [[3 + (ord(c) % 100) for c in text][:max_length] for text in texts]
        if not padding:
            return {"input_ids": ids}
        return _padded(ids, "right")


def test_score_layers_is_independent_of_batching_order(tiny_llama):
    """make_batches sorts samples by length; scores must be those of the original sample order."""
    texts = ["a", "bbbbbbbb", "cc", "ddddd", "eeeeeeeeeeee", "fff", "gggg", "h" * 7]
    samples = TextSamples(texts=texts, text_pairs=None, source="test", fingerprint="x")
    stack = resolve_block_stack(tiny_llama)
    by_batch = {
        size: score_layers(tiny_llama, _CharTokenizer(), samples, stack, pooling="last", batch_size=size, progress=False)
        for size in (1, 3, 8)
    }
    for i in range(stack.num_layers):
        assert by_batch[1][i].similarity == pytest.approx(by_batch[8][i].similarity, abs=1e-5)
        assert by_batch[3][i].similarity == pytest.approx(by_batch[8][i].similarity, abs=1e-5)
