"""Manual GPU check: block capture on a model spread over devices (device_map) in fp32/bf16/fp16.

Builds a tiny random Llama, scores it on CPU in fp32 as the reference, then loads it with layers
0-3 on cuda:0 and 4-7 on cuda:1 (CPU-offloaded when there is one GPU) and with
device_map="auto", and prints the largest CKA difference from the reference. Run from the repo
root: ``PYTHONPATH=src python scripts/check_multi_device.py``. Seen on 2 x H200 (torch 2.11,
transformers 5.17): fp32 2e-08, bf16 9e-05, fp16 1.5e-05.
"""

import tempfile

import torch
from transformers import AutoModel, LlamaConfig

from lwlora.blocks import resolve_block_stack
from lwlora.selection.capture import capture_block_representations
from lwlora.selection.scoring import get_scorer


def scores(model, batches):
    stack = resolve_block_stack(model)
    reps = capture_block_representations(model, stack, batches, pooling="last", progress=False, statistics="rows")
    cka = get_scorer("cka")
    return [cka(x, y).similarity for x, y in zip(reps.inputs, reps.outputs)]


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    reference_model = AutoModel.from_config(config).eval()
    ids = torch.randint(5, 1000, (16, 40))
    mask = torch.ones_like(ids)
    mask[:8, :10] = 0  # left padding on half the samples
    batches = [{"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, 16, 8)]
    reference = scores(reference_model, batches)
    directory = tempfile.mkdtemp()
    reference_model.save_pretrained(directory)
    second = 1 if torch.cuda.device_count() > 1 else "cpu"
    device_map = {"embed_tokens": 0, "rotary_emb": 0, "norm": second, **{f"layers.{i}": (0 if i < 4 else second) for i in range(8)}}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, mapping in (("split", device_map), ("auto", "auto")):
            model = AutoModel.from_pretrained(directory, device_map=mapping, dtype=dtype).eval()
            error = max(abs(a - b) for a, b in zip(scores(model, batches), reference))
            print(f"{dtype} device_map={name}: max |CKA - CPU fp32 CKA| = {error:.2e}")


if __name__ == "__main__":
    main()
