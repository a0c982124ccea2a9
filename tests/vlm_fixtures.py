"""Tiny saved vision-language checkpoints (LLaVA, LLaVA-NeXT, Gemma 3) with real processors, and a tiny
ScienceQA-style dataset of generated PNG images — everything offline, from configs.

The processors are transformers' own (``LlavaProcessor`` / ``LlavaNextProcessor`` /
``Gemma3Processor`` with their PIL image processors: no torchvision needed) over a word-level
tokenizer whose vocabulary covers every word of the data, so nothing maps to ``<unk>`` and the
answer letters are single tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CHOICES = ["red", "green", "blue"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE_WORDS = "USER ASSISTANT : Context Answer with the option ' s letter from given choices directly . A B C D E"
HINTS = ["", "Look at the picture .", "The picture shows one colour ."]


def scienceqa_records(n: int, *, seed: int, image_dir: Path, relative_to: Path) -> list[dict]:
    """``n`` ScienceQA-style records: which colour fills the image; images written as PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        answer = int(rng.integers(len(CHOICES)))
        pixels = np.clip(np.array(COLOURS[CHOICES[answer]]) + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype("uint8")
        path = image_dir / f"{seed}-{i}.png"
        Image.fromarray(pixels).save(path)
        records.append({
            "image": str(path.relative_to(relative_to)),
            "question": f"Which colour fills picture {i} ?",
            "choices": CHOICES,
            "answer": answer,
            "hint": HINTS[i % len(HINTS)],
            "lecture": "Colours are seen with light .",
        })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_scienceqa_dir(root: Path, *, train: int = 12, test: int = 6) -> Path:
    """A directory of splits: ``train.jsonl``, ``test.jsonl`` and ``images/`` (paths relative)."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", scienceqa_records(train, seed=0, image_dir=root / "images", relative_to=root))
    write_jsonl(root / "test.jsonl", scienceqa_records(test, seed=1, image_dir=root / "images", relative_to=root))
    return root


def _vocabulary(extra_specials: list[str]) -> dict[str, int]:
    from tokenizers import pre_tokenizers

    from lwlora.tasks.scienceqa import INSTRUCTION

    split = pre_tokenizers.Whitespace()
    texts = [TEMPLATE_WORDS, INSTRUCTION, *HINTS, "Which colour fills picture ?", "Colours are seen with light .", "the answer is", *CHOICES]
    texts += [str(i) for i in range(64)]
    words = [w for text in texts for w, _ in split.pre_tokenize_str(text)]
    return {token: i for i, token in enumerate(dict.fromkeys(SPECIALS + words + extra_specials))}


def _tokenizer(extra_specials: dict[str, str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(_vocabulary(list(extra_specials.values())), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama: BOS/EOS and no pad token (lwlora must pick one).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=extra_specials, model_input_names=["input_ids", "attention_mask"],
    )


def _decoder_config(vocab_size: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=None, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra,
    )


def save_tiny_llava(directory: Path) -> Path:
    """LLaVA-1.5 in miniature: CLIP vision tower (3 blocks; 16x16 images, 8x8 patches → 4 image
    tokens after dropping CLS, as ``vision_feature_select_strategy="default"``), Llama text (4 blocks)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil,
    )

    tokenizer = _tokenizer({"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32)
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**_decoder_config(len(tokenizer))), image_token_index=tokenizer.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_gemma3(directory: Path) -> Path:
    """Gemma 3 in miniature: SigLIP vision tower (2 blocks; 4 image tokens), Gemma 3 text (4 blocks);
    the processor returns ``token_type_ids`` (image tokens attend bidirectionally)."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil,
    )

    specials = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = _tokenizer(specials)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tokenizer, image_seq_length=4)
    text = Gemma3TextConfig(**_decoder_config(len(tokenizer), head_dim=16, sliding_window=8, query_pre_attn_scalar=16))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_llava_next(directory: Path) -> Path:
    """LLaVA-NeXT in miniature: any-resolution tiling (grid pinpoints 16x16, 16x32, 32x16), so the
    vision tower sees several crops per image and the processor returns ``image_sizes``."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tokenizer = _tokenizer({"image_token": "<image>"})
    grid = [[16, 16], [16, 32], [32, 16]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=grid),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**_decoder_config(len(tokenizer))), image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=grid, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
