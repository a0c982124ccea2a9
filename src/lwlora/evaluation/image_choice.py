"""Multiple-choice evaluation of vision-language models on examples with an image (``scienceqa``).

- ``letter`` (default): batched greedy generation from the prompt + image (left padding), then the
  option letter parsed by :func:`lwlora.evaluation.answers.extract_choice_letter` (explicit
  "answer is B", a leading "B.", "(B)", a bare capital "B", ...; letters beyond the options never
  count); a generation without a letter is wrong → ``accuracy``.
- ``loglik``: one forward pass per batch; the prediction is the option letter whose first token
  (as it is encoded for training: ``ImageTextCollator.answer_ids``) has the highest next-token
  logit after the prompt → ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lwlora.evaluation.answers import extract_choice_letter
from lwlora.evaluation.generation import _device


def _batches(examples: Sequence[Any], processor: Any, batch_size: int, progress: bool, desc: str):
    """(indices, left-padded model inputs) per batch, longest prompts first (less padding)."""
    from tqdm.auto import tqdm

    from lwlora.multimodal import build_prompt, encode

    prompts = [build_prompt(processor, e.prompt) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        yield chunk, encode(processor, [prompts[i] for i in chunk], [examples[i].image for i in chunk], side="left")


def generate_with_images(model: nn.Module, processor: Any, examples: Sequence[Any], *, max_new_tokens: int = 32, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy completions (new text only) of ``examples`` (``prompt`` + ``image``), in order."""
    from lwlora.multimodal import text_tokenizer

    tokenizer = text_tokenizer(processor)
    outputs = [""] * len(examples)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        for chunk, encoded in _batches(examples, processor, batch_size, progress, "generating"):
            encoded = {k: v.to(device) for k, v in encoded.items()}
            with torch.inference_mode():
                generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        model.train(was_training)
    return outputs


def choose_letters_by_loglik(model: nn.Module, processor: Any, examples: Sequence[Any], *, batch_size: int = 8, progress: bool = True) -> list[str]:
    """The most likely option letter after each example's prompt + image."""
    from lwlora.multimodal import ImageTextCollator

    encode_answer = ImageTextCollator(processor, max_length=1).answer_ids
    letter_ids = {letter: encode_answer(letter)[0] for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    predictions = [""] * len(examples)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        for chunk, encoded in _batches(examples, processor, batch_size, progress, "scoring options"):
            with torch.inference_mode():
                logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits[:, -1].float()  # (B, V), left padding
            for row, i in enumerate(chunk):
                letters = [chr(ord("A") + k) for k in range(len(examples[i].choices))]
                scores = logits[row, [letter_ids[x] for x in letters]]
                predictions[i] = letters[int(torch.argmax(scores))]
    finally:
        model.train(was_training)
    return predictions


def evaluate_image_choices(model: nn.Module, processor: Any, examples: Sequence[Any], *, max_new_tokens: int = 32, batch_size: int = 8, choice_mode: str = "letter", progress: bool = True) -> dict[str, Any]:
    """Accuracy on ``examples`` (``EvalExample`` of kind ``choice`` with an ``image``):
    ``{"metrics": {"accuracy", "n"}, "records": [per-example dicts]}``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if any(e.kind != "choice" or e.image is None or not e.choices for e in examples):
        raise ValueError("image evaluation takes multiple-choice examples with an image and their choices")
    records: list[dict[str, Any]] = []
    if choice_mode == "loglik":
        for example, predicted in zip(examples, choose_letters_by_loglik(model, processor, examples, batch_size=batch_size, progress=progress)):
            records.append({"prediction": predicted, "reference": example.reference, "correct": predicted == example.reference.strip().upper()})
    elif choice_mode == "letter":
        generations = generate_with_images(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        for example, text in zip(examples, generations):
            predicted = extract_choice_letter(text, len(example.choices))
            records.append({"generation": text, "prediction": predicted, "reference": example.reference, "correct": predicted == example.reference.strip().upper()})
    else:
        raise ValueError(f"choice_mode must be 'letter' or 'loglik', got {choice_mode!r}")
    return {"metrics": {"accuracy": sum(r["correct"] for r in records) / len(records), "n": len(records)}, "records": records}
