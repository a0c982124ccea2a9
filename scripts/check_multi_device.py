"""Manual GPU check: block capture on a model spread over devices (device_map) in fp32/bf16/fp16.

Builds a tiny random Llama, scores it on CPU in fp32 as the reference, then loads it with layers
0-3 on cuda:0 and 4-7 on cuda:1 (or CPU-offloaded when there is one GPU) and with
device_map="auto", and prints the largest CKA difference from the reference. Run from the repo
root: ``python scripts/check_multi_device.py``. Seen on 2 × H200 (torch 2.11, transformers 5.17):
fp32 2e-08, bf16 9e-05, fp16 1.5e-05.
"""
import sys

import peft
import torch
import transformers

sys.path.insert(0, "src")
from transformers import AutoModel, LlamaConfig

from lwlora.blocks import resolve_block_stack
from lwlora.capture import capture_block_representations
from lwlora.scoring import get_scorer

print("versions", torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name(0))
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
ref = AutoModel.from_config(cfg).eval()
ids = torch.randint(5, 1000, (16, 40)); mask = torch.ones_like(ids); mask[:8, :10] = 0  # left padding on half
batches = [{"input_ids": ids[i:i+8], "attention_mask": mask[i:i+8]} for i in range(0, 16, 8)]
def run(model):
    stack = resolve_block_stack(model)
    reps = capture_block_representations(model, stack, batches, pooling="last", progress=False)
    return [get_scorer("cka")(x, y).similarity for x, y in zip(reps.inputs, reps.outputs)], [x.device for x in reps.inputs]
cpu_scores, _ = run(ref)
# spread over cuda:0 and cpu via accelerate's device_map
import tempfile

d = tempfile.mkdtemp(); ref.save_pretrained(d)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    dm = {"embed_tokens": 0, "rotary_emb": 0, "norm": (1 if torch.cuda.device_count() > 1 else "cpu"), **{f"layers.{i}": (0 if i < 4 else (1 if torch.cuda.device_count() > 1 else "cpu")) for i in range(8)}}
    m = AutoModel.from_pretrained(d, device_map=dm, dtype=dtype).eval()
    scores, devices = run(m)
    err = max(abs(a - b) for a, b in zip(scores, cpu_scores))
    print(dtype, "devices", sorted({str(x) for x in devices}), "max |cka - cpu fp32 cka| =", f"{err:.2e}")
    m2 = AutoModel.from_pretrained(d, device_map="auto", dtype=dtype).eval()
    s2, dev2 = run(m2); print("  device_map=auto", sorted({str(x) for x in dev2}), f"{max(abs(a-b) for a,b in zip(s2, cpu_scores)):.2e}")
