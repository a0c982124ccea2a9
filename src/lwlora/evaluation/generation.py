"""Generation-based evaluation of causal LMs: batched greedy decoding, then a per-kind check.

- ``math``: the predicted number (``answers.extract_predicted_number``: after ``####``, in
  ``\\boxed{}``, after "the answer is", else the last number) must equal a numeric reference
  exactly; a non-numeric (MATH) reference must equal the last ``\\boxed{}`` after
  normalisation, or be mathematically equal to it by ``math-verify``
  (``answers.math_answer_matches``) → ``exact_match``.
- ``choice``: by generated letter (``answers.extract_choice_letter``) or, with
  ``choice_mode="loglik"``, by the most likely option letter after the prompt (its forms " A",
  "A", " a", "a" together, each scored over all its tokens; no generation) → ``accuracy``.
- ``code``: the completion is run with the problem's tests in the sandbox (time and memory
  limits, no network, temporary directory, killed process group) → ``pass@1``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lwlora.evaluation.answers import (
    extract_choice_letter,
    math_answer_matches,
)

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (the new text only), batched with left padding, in
    length order to cut padding; results in the order of ``prompts``."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for start in tqdm(
            range(0, len(order), batch_size),
            desc="generating",
            unit="batch",
            disable=not progress,
        ):
            chunk = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True
            ).to(device)
            with torch.inference_mode():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(
                chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            ):
                outputs[i] = text
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return outputs


#: the surface forms of an option letter that ``choose_by_loglik`` scores (their probabilities add):
#: " A" after "Answer:", "A" or "a" at the start of a response line ("a) 40" as in MathQA).
LETTER_FORMS: tuple[str, ...] = (" {upper}", "{upper}", " {lower}", "{lower}")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_logprobs(model: nn.Module, tokenizer: Any, prompt: str, continuations: Sequence[str]) -> list[float]:
    """log p(continuation | prompt) for each continuation, summed over its tokens, in one batched
    forward pass (right padding, float32 log-softmax).

    The continuation's tokens are those where ``tokenizer(prompt + continuation)`` departs from
    ``tokenizer(prompt)``, so a continuation that the tokenizer splits into several pieces
    (SentencePiece's ``▁`` + ``A``) or merges with the prompt's last token is scored whole.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    rows, starts = [], []
    for text in continuations:
        full = tokenizer(prompt + text)["input_ids"]
        start = max(1, _common_prefix(prompt_ids, full))
        if start >= len(full):
            raise ValueError(f"continuation {text!r} adds no token after the prompt")
        rows.append(full)
        starts.append(start)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = []
    for i, (row, start) in enumerate(zip(rows, starts)):
        positions = torch.arange(start, len(row), device=device)
        scores.append(float(logprobs[i, positions - 1, ids[i, positions]].sum()))
    return scores


def choose_by_loglik(
    model: nn.Module, tokenizer: Any, prompt: str, num_choices: int
) -> str:
    """The option letter most likely right after ``prompt``: for each letter the probabilities of
    its forms (``LETTER_FORMS``: " A", "A", " a", "a") add, each form scored over all its tokens
    (``continuation_logprobs``)."""
    letters = string.ascii_uppercase[:num_choices]
    forms = [form.format(upper=letter, lower=letter.lower()) for letter in letters for form in LETTER_FORMS]
    scores = torch.tensor(continuation_logprobs(model, tokenizer, prompt, forms)).view(len(letters), len(LETTER_FORMS))
    return letters[int(torch.argmax(torch.logsumexp(scores, dim=1)))]


def code_program(example: Any, completion: str) -> str:
    """The program to test: the completion (a fenced block if there is one) after the problem's
    prompt, unless the completion defines the entry point itself; then the problem's tests."""
    fenced = _FENCE.search(completion)
    code = fenced.group(1) if fenced else completion
    prompt = example.code_prompt or ""
    if example.entry_point and re.search(
        rf"^\s*def\s+{re.escape(example.entry_point)}\s*\(", code, re.MULTILINE
    ):
        imports = "\n".join(
            line
            for line in prompt.splitlines()
            if line.startswith(("import ", "from "))
        )
        body = f"{imports}\n{code}"
    else:
        body = prompt + code
    check = f"check({example.entry_point})\n" if example.entry_point else ""  # MBPP: bare assertions
    return f"{body}\n{example.reference}\n{check}"


def evaluate_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    choice_mode: str = "letter",
    progress: bool = True,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Evaluate ``examples`` (``lwlora.tasks.EvalExample``) and return
    ``{"metrics": {name: value, "n": count}, "records": [per-example dicts]}``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    kinds = {e.kind for e in examples}
    if len(kinds) != 1:
        raise ValueError(f"one kind of example per evaluation set, got {sorted(kinds)}")
    kind = kinds.pop()
    records: list[dict[str, Any]] = []
    if kind == "choice" and choice_mode == "loglik":
        for example in examples:
            predicted = choose_by_loglik(
                model, tokenizer, example.prompt, len(example.choices or "ABCD")
            )
            records.append(
                {
                    "prediction": predicted,
                    "reference": example.reference,
                    "correct": predicted == example.reference.strip().upper(),
                }
            )
        return {
            "metrics": {
                "accuracy": sum(r["correct"] for r in records) / len(records),
                "n": len(records),
            },
            "records": records,
        }

    generations = generate_greedy(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    if kind == "math":
        for example, text in zip(examples, generations):
            predicted, correct = math_answer_matches(text, example.reference)
            records.append({"generation": text, "prediction": predicted, "reference": example.reference, "correct": correct})
        metrics = {"exact_match": sum(r["correct"] for r in records) / len(records)}
    elif kind == "choice":
        for example, text in zip(examples, generations):
            predicted = extract_choice_letter(text, len(example.choices or "ABCD"))
            records.append(
                {
                    "generation": text,
                    "prediction": predicted,
                    "reference": example.reference,
                    "correct": predicted == example.reference.strip().upper(),
                }
            )
        metrics = {"accuracy": sum(r["correct"] for r in records) / len(records)}
    elif kind == "code":
        from lwlora.evaluation.sandbox import pass_at_1, run_python

        results = []
        for example, text in zip(examples, generations):
            result = run_python(code_program(example, text), timeout_s=timeout_s)
            results.append(result)
            records.append(
                {"generation": text, "status": result.status, "correct": result.passed}
            )
        metrics = {"pass@1": pass_at_1(results)}
    else:
        raise ValueError(f"unknown example kind {kind!r}")
    metrics["n"] = len(records)
    return {"metrics": metrics, "records": records}
