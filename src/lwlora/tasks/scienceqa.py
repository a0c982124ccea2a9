"""``scienceqa``: ScienceQA (Lu et al. 2022) multiple choice with images, for vision-language models
(the paper's LLaVA-1.5-7B experiment).

Data: the Hub's ``derek-thomas/ScienceQA`` (train split for training and selection, test split for
evaluation), or ``--data`` with the same fields locally: a JSONL/JSON/CSV/Parquet file (train only)
or a directory of splits (``train.jsonl`` plus ``test.jsonl`` or ``validation.jsonl``). A record::

    {"image": "images/0001.png", "question": "Which is a mammal?", "choices": ["frog", "dog"],
     "answer": 1, "hint": "optional context", "lecture": "optional, unused"}

``image`` is a path (relative to the data file's directory, or absolute) or, for Hub/Parquet data,
an image column; ``answer`` the index of the right choice, its letter or its text; ``hint``
(alias ``context``) optional. Examples without an image (ScienceQA has text-only questions) are
skipped, as in the issue's image subset; their number is in ``PreparedTask.info`` and a warning.

Prompt (LLaVA-1.5's ScienceQA format, "CQM-A": context, question, options, letter answer; the
lecture is not shown, as in LLaVA's evaluation)::

    Context: {hint}
    {question}
    A. {choice 0}
    B. {choice 1}
    Answer with the option's letter from the given choices directly.

wrapped in the model's chat format with the image (:func:`lwlora.multimodal.build_prompt`). The
target is the answer letter and EOS; the loss is on them only. Evaluation: accuracy of the letter
parsed from the greedy generation (``--choice-mode loglik``: the most likely option letter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lwlora.errors import ConfigError
from lwlora.multimodal import (
    ImageTextCollator,
    ImageTextSamples,
    data_base_dir,
    make_image_text_samples,
    resolve_image_ref,
    undecoded_images,
)
from lwlora.tasks.base import (
    EvalExample,
    PreparedTask,
    columns_of,
    load_hub_dataset,
    load_source,
    subset_indices,
)
from lwlora.tasks.presets import SCIENCEQA_HUB_NAME

logger = logging.getLogger("lwlora")

IMAGE_COLUMN = "image"
REQUIRED_COLUMNS = ("image", "question", "choices", "answer")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def scienceqa_prompt(record: dict[str, Any]) -> str:
    """The user message of one ScienceQA record (see the module docstring)."""
    context = str(record.get("hint") or record.get("context") or "").strip()
    lines = [f"Context: {context}"] if context else []
    lines.append(str(record["question"]).strip())
    lines += [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(record["choices"])]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def answer_letter(record: dict[str, Any], index: int, source: str) -> str:
    """The right option's letter: ``answer`` may be the choice index, its letter or its text."""
    choices, answer = record.get("choices"), record.get("answer")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise ConfigError("--data", f"example {index} of {source}: choices must be a list of 2 to {len(LETTERS)} options, got {choices!r}")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return LETTERS[answer]
    if isinstance(answer, str) and answer in choices:
        return LETTERS[choices.index(answer)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[: len(choices)]:
        return answer.strip().upper()
    raise ConfigError("--data", f"example {index} of {source}: answer {answer!r} is not a choice index, letter or text of {choices}")


def _check_columns(records: Any, source: str) -> None:
    columns = columns_of(records)
    if IMAGE_COLUMN not in columns:
        raise ConfigError("--data", f"{source} has no {IMAGE_COLUMN!r} column (image path or image); scienceqa needs one image per example; it has {columns}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConfigError("--data", f"{source} lacks column(s) {missing} that scienceqa needs; it has {columns}")


def _image_rows(records: Any) -> list[int]:
    """Indices of the records that have an image (reads only the image column's validity)."""
    table = getattr(records, "data", None)
    if table is not None and getattr(records, "_indices", None) is None:
        import pyarrow.compute as pc

        return [i for i, ok in enumerate(pc.is_valid(table.column(IMAGE_COLUMN)).to_pylist()) if ok]
    return [i for i in range(len(records)) if records[i].get(IMAGE_COLUMN) not in (None, "")]


class ScienceQAExamples:
    """Training examples ``{"prompt", "answer", "image"}`` for :class:`ImageTextCollator`; images
    are read from the records only when an example is fetched (the Hub split holds thousands)."""

    def __init__(self, records: Any, rows: list[int], prompts: list[str], answers: list[str], images: list[Any] | None):
        self.records, self.rows, self.prompts, self.answers, self.images = records, rows, prompts, answers, images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i] if self.images is not None else self.records[self.rows[i]][IMAGE_COLUMN]
        return {"prompt": self.prompts[i], "answer": self.answers[i], "image": image}


@dataclass
class Examples:
    """The examples with an image of one split: record ``rows``, their prompts, answer letters and
    options; ``images`` are checked absolute paths for local data, None for Hub data (the images
    stay in ``records``, undecoded); ``skipped`` counts the examples without an image."""

    records: Any
    rows: list[int]
    prompts: list[str]
    letters: list[str]
    choices: list[list[str]]
    images: list[Any] | None
    skipped: int

    def image_refs(self) -> list[Any]:
        return self.images if self.images is not None else [self.records[i][IMAGE_COLUMN] for i in self.rows]


def prepare_examples(records: Any, source: str, spec: str | None, cap: int | None, seed: int | None) -> Examples:
    """The examples with an image, capped at ``cap`` (a seeded draw, or the first ones when
    ``seed`` is None). Local image paths are checked and made absolute here."""
    _check_columns(records, source)
    records = undecoded_images(records, IMAGE_COLUMN)
    with_image = _image_rows(records)
    skipped = len(records) - len(with_image)
    rows = [with_image[k] for k in subset_indices(len(with_image), cap, seed)]
    text_columns = [c for c in columns_of(records) if c != IMAGE_COLUMN]
    texts = records.select_columns(text_columns) if hasattr(records, "select_columns") else records
    prompts, letters, choices = [], [], []
    for i in rows:
        record = texts[i]
        letters.append(answer_letter(record, i, source))
        prompts.append(scienceqa_prompt(record))
        choices.append([str(c) for c in record["choices"]])
    images = None
    base = data_base_dir(spec)
    if base is not None or not hasattr(records, "features"):
        images = [resolve_image_ref(records[i][IMAGE_COLUMN], base, flag="--data", where=f"example {i} of {source}") for i in rows]
    return Examples(records, rows, prompts, letters, choices, images, skipped)


def _train_records(data: str | None) -> tuple[Any, dict[str, Any], str]:
    if data:
        train, evals = load_source(data, ("test", "validation"))
        return train, evals, data
    train = load_hub_dataset(SCIENCEQA_HUB_NAME, split="train", what="for --task scienceqa (offline? pass --data with a local JSONL or directory)")
    return train, {}, SCIENCEQA_HUB_NAME


def scienceqa_selection_samples(data: str | None, *, num_samples: int, seed: int) -> ImageTextSamples:
    """``num_samples`` training examples with images (seeded), as prompt + answer letter: what the
    model reads in training, as the reference decoder scripts score prompt + response."""
    train, _, source = _train_records(data)
    return _selection(train, source, data, num_samples, seed)


def _selection(train: Any, source: str, spec: str | None, num_samples: int, seed: int) -> ImageTextSamples:
    examples = prepare_examples(train, source, spec, num_samples, seed)
    if not examples.rows:
        raise ConfigError("--data", f"{source} has no example with an image")
    return make_image_text_samples(examples.prompts, examples.image_refs(), source=f"task:scienceqa {source}", responses=[" " + letter for letter in examples.letters])


def load_scienceqa(processor: Any, *, data: str | None, max_length: int, max_train_samples: int | None, max_eval_samples: int | None, selection_samples: int, seed: int, packing: bool) -> PreparedTask:
    """The ``scienceqa`` task for a vision-language model; ``processor`` is its ``AutoProcessor``."""
    from lwlora.multimodal import is_processor

    if packing:
        raise ConfigError("--packing", "does not apply to scienceqa (one image per example)")
    if not is_processor(processor):
        raise ConfigError("MODEL", "scienceqa needs a vision-language model with an image processor")
    train_records, evals, source = _train_records(data)
    examples = prepare_examples(train_records, source, data, max_train_samples, seed)
    if not examples.rows:
        raise ConfigError("--data", f"the training split of {source} has no example with an image")
    if examples.skipped:
        logger.warning(f"scienceqa: skipped {examples.skipped} training examples without an image in {source}")
    train = ScienceQAExamples(examples.records, examples.rows, examples.prompts, examples.letters, examples.images)

    if not data:
        evals = {"test": load_hub_dataset(SCIENCEQA_HUB_NAME, split="test", what="(the ScienceQA test split that --task scienceqa evaluates on)")}
    eval_examples: dict[str, list[EvalExample]] = {}
    for split, records in evals.items():  # one split: test, else validation
        held_out = prepare_examples(records, f"{source} ({split})", data, max_eval_samples, None)
        if held_out.rows:
            eval_examples["scienceqa"] = [
                EvalExample(prompt=p, reference=letter, kind="choice", choices=c, image=image)
                for p, letter, c, image in zip(held_out.prompts, held_out.letters, held_out.choices, held_out.image_refs())
            ]

    collator = ImageTextCollator(processor, max_length)
    collator([train[i] for i in range(min(2, len(train)))])  # fail on --max-length now, not mid-training
    selection = _selection(train_records, source, data, selection_samples, seed)
    return PreparedTask(
        name="scienceqa",
        kind="causal_lm",
        train=train,
        eval={},
        eval_examples=eval_examples,
        num_labels=None,
        label_names=None,
        metric_names=["accuracy"],
        selection_texts=selection,
        data_collator=collator,
        info={"source": source, "train_examples": len(examples.rows), "skipped_without_image": examples.skipped, "eval_examples": len(eval_examples.get("scienceqa", []))},
        processor=processor,
    )
