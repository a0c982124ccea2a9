"""``lwlora eval``: evaluate a finished run (base model + its adapter) or a bare model on a task."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lwlora.errors import ConfigError
from lwlora.fields import check_at_least, coerce_fields, option


def evaluate_classification(model: nn.Module, task: Any, *, batch_size: int = 32, progress: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of a sequence classification/regression model on every eval split of ``task``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from lwlora.evaluation.metrics import compute_metrics, predictions_from_logits

    device = next(p.device for p in model.parameters())
    results: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for name, dataset in task.eval.items():
            predictions: list[Any] = []
            references: list[Any] = []
            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=task.data_collator)
            for batch in tqdm(loader, desc=f"evaluating {name}", unit="batch", disable=not progress):
                labels = batch.pop("labels")
                with torch.inference_mode():
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
                predictions += predictions_from_logits(logits, task.kind).tolist()
                references += labels.tolist()
            results[name] = {**compute_metrics(task.metric_names, predictions, references), "n": len(references)}
    finally:
        model.train(was_training)
    return results


def evaluate_task(model: nn.Module, tokenizer: Any, task: Any, *, batch_size: int = 8, max_new_tokens: int = 256, choice_mode: str = "letter", progress: bool = True) -> dict[str, Any]:
    """All evaluations a task defines: classification metrics, or generation-based metrics."""
    if task.kind != "causal_lm":
        return evaluate_classification(model, task, batch_size=batch_size, progress=progress)
    from lwlora.evaluation.generation import evaluate_examples

    if not task.eval_examples:
        raise ConfigError("--task", f"{task.name} defines no generation evaluation set")
    if getattr(task, "processor", None) is not None:  # image tasks: ``tokenizer`` is the model's processor
        from lwlora.evaluation.image_choice import evaluate_image_choices

        return {
            name: evaluate_image_choices(model, task.processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, choice_mode=choice_mode, progress=progress)["metrics"]
            for name, examples in task.eval_examples.items()
        }
    return {
        name: evaluate_examples(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, choice_mode=choice_mode, progress=progress)["metrics"]
        for name, examples in task.eval_examples.items()
    }


def load_run(run: Path):
    """The ``TrainConfig`` a run directory was trained with."""
    from lwlora.training.config import TrainConfig
    from lwlora.training.run_dir import CONFIG_FILE

    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError("RUN", f"{run} is not a run directory ({CONFIG_FILE} missing)")
    config = TrainConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")), source=str(config_path))
    return config


def evaluate(target: str, *, task: str | None = None, data: str | None = None, max_eval_samples: int | None = None, eval_splits: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None, choice_mode: str = "letter", progress: bool = True, gguf_file: str | None = None) -> dict[str, Any]:
    """Evaluate ``target``: a run directory (its base model + adapter, its task unless ``task``)
    or a model (``task`` required)."""
    from peft import PeftModel

    from lwlora.tasks import load_task
    from lwlora.training.config import TrainConfig
    from lwlora.training.loading import load_task_model, load_tokenizer

    path = Path(target)
    run = path if (path / "train_config.json").is_file() else None
    if run is not None:
        config = load_run(run)
        overrides = {"task": task or config.task, "data": data if data is not None else config.data, "resume": False, "overwrite": False}
        if max_eval_samples is not None:
            overrides["max_eval_samples"] = max_eval_samples
        if eval_splits is not None:
            overrides["eval_splits"] = eval_splits
        elif task is not None and task != config.task:
            overrides["eval_splits"] = None  # the run's splits belong to its own task
        config = TrainConfig(**{**config.to_json(), **overrides})
    else:
        if task is None:
            raise ConfigError("--task", "is required when evaluating a model rather than a run directory")
        config = TrainConfig(model=target, task=task, out="-", data=data, max_eval_samples=max_eval_samples, eval_splits=eval_splits, gguf_file=gguf_file)
    tokenizer, source, resolved_gguf = load_tokenizer(config.model, task=config.task, gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code)
    prepared = load_task(config.task, tokenizer, data=config.data, text_column=config.text_column, text_pair_column=config.text_pair_column, label_column=config.label_column,
        instruction_field=config.instruction_field,
        output_field=config.output_field, max_length=config.max_length, max_train_samples=1, max_eval_samples=config.max_eval_samples, eval_splits=config.eval_splits, selection_samples=1, seed=config.seed)
    if run is not None and config.method == "full":
        source, resolved_gguf = str(run / "model"), None
    model = load_task_model(config.model, source, resolved_gguf, prepared, tokenizer, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if run is not None and config.method != "full":
        adapter = run / "adapter"
        if not adapter.is_dir():
            raise ConfigError("RUN", f"{run} has no adapter/ (did training finish?)")
        model = PeftModel.from_pretrained(model, str(adapter))
    if torch.cuda.is_available():
        model.to("cuda")
    return evaluate_task(model, tokenizer, prepared, batch_size=batch_size, max_new_tokens=max_new_tokens or config.max_new_tokens, choice_mode=choice_mode, progress=progress)


@dataclass(frozen=True)
class EvalConfig:
    """What ``lwlora eval`` takes (each field a flag of the same name)."""

    target: str = option(help="a run directory written by lwlora train, or a model")
    task: str | None = option(None, "task (default: the run's; required for a model)")
    data: str | None = option(None, "data override")
    gguf_file: str | None = option(None, "GGUF file inside MODEL")
    max_eval_samples: int | None = option(None, "evaluate on at most this many examples per split")
    eval_splits: str | None = option(None, "comma-separated splits of a --data directory (default: the run's, else the first of validation, test)")
    batch_size: int = option(8, "evaluation (generation) batch")
    max_new_tokens: int | None = option(None, "tokens generated per answer (default: the run's, else 256)")
    choice_mode: Literal["letter", "loglik"] = option("letter", "multiple choice: letter (generated) or loglik (most likely option letter)")
    out: str | None = option(None, "write the results as JSON here (default: RUN/eval.json for a run)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_at_least("--batch-size", self.batch_size)
        check_at_least("--max-eval-samples", self.max_eval_samples)
        check_at_least("--max-new-tokens", self.max_new_tokens)


def run(config: EvalConfig) -> int:
    """``lwlora eval``: check where the results go, evaluate, print and write them."""
    from lwlora.io import atomic_write_json, check_output_file

    is_run = (Path(config.target) / "train_config.json").is_file()
    out = config.out or (str(Path(config.target) / "eval.json") if is_run else None)
    if out:
        check_output_file(out, "--out")  # before the model is loaded
    results = evaluate(config.target, task=config.task, data=config.data, max_eval_samples=config.max_eval_samples, eval_splits=config.eval_splits, batch_size=config.batch_size,
                       max_new_tokens=config.max_new_tokens, choice_mode=config.choice_mode, progress=config.progress, gguf_file=config.gguf_file)
    print(json.dumps(results, indent=2))
    if out:
        atomic_write_json(out, results)
        print(f"wrote {out}")
    return 0
