"""``lwlora select``: load the model and the samples, then run the selection pipeline.

``select_layers(SelectConfig(model=..., data=...))`` returns a
:class:`~lwlora.selection.artifact.LayerSelection`. ``SelectConfig`` is the source (model, data,
how records become text) plus :class:`~lwlora.selection.options.SelectOptions`; the options'
fields may also be given flat (``SelectConfig(model=..., data=..., ratio=0.5)``), and read so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lwlora.errors import ConfigError
from lwlora.fields import check_choice, coerce_fields, init_holding, option
from lwlora.selection.artifact import LayerSelection
from lwlora.selection.options import (
    DTYPES,
    GRADIENT_SCORERS,
    OPTION_NAMES,
    DType,
    SelectOptions,
    check_device,
    check_measurement,
    method_fields,
)
from lwlora.tasks.presets import IMAGE_TASKS


def _translate(flat: dict[str, Any], _values: dict[str, Any]) -> dict[str, Any]:
    """``scorer`` may name a rule (``--scorer random``), as it always could."""
    scorer = flat.pop("scorer", None)
    if scorer is not None:
        flat.update(method_fields(scorer))
    return flat


@dataclass(frozen=True, init=False)
class SelectConfig:
    """What ``lwlora select`` scores (each field a flag of the same name) and how it chooses
    (``options``; their fields are flags too)."""

    model: str = option(help="Hub id, local directory, or builtin:minilm / builtin:smollm2")
    data: str = option("", "file (.jsonl/.json/.csv/.parquet/.txt), directory of splits (DIR[:split]), Hub dataset name[:config][:split], or builtin:humaneval")
    task: str | None = option(None, "scienceqa: its image-text training inputs (vision-language models); fim/gradnorm: the task giving labelled inputs (default: classification for encoders, instruction for decoders)")
    label_column: str | None = option(None, "fim/gradnorm on classification data: the label column")
    instruction_field: str | None = option(None, "fim/gradnorm on instruction data: the prompt field")
    output_field: str | None = option(None, "fim/gradnorm on instruction data: the response field")
    text_column: str | None = option(None, "column holding the text (default: detected)")
    text_pair_column: str | None = option(None, "second text column for sentence pairs")
    template: str | None = option(None, "format string over columns, e.g. '{question} {answer}', or a preset: alpaca, alpaca-response")
    image_column: str | None = option(None, "vision-language models: column with each sample's image (a path relative to the data file, or an image column); not truncated")
    gguf_file: str | None = option(None, "GGUF file inside MODEL (dequantized on load)")
    device: str = option("auto", "auto (all GPUs via device_map=auto, else cpu), cpu, cuda, cuda:N, mps")
    dtype: DType = option("auto", "auto, float32, bfloat16, float16 (pooled vectors are always fp32, the CKA maths float64)")
    trust_remote_code: bool = option(False, "allow the model's own code from the Hub")
    progress: bool = option(True, "show progress bars")
    options: SelectOptions = option(SelectOptions(), "how the blocks are chosen", cli=False)

    def __init__(self, model: str, data: str = "", **values: Any) -> None:
        init_holding(self, {"model": model, "data": data, **values}, nested="options", nested_type=SelectOptions, translate=_translate)

    def __post_init__(self) -> None:
        coerce_fields(self, skip=("options",))  # the options coerced themselves
        if not self.options.measures:  # a rule scores nothing: measurement options would be ignored
            check_measurement(self.options.rule, feature_norm=self.options.feature_norm, num_samples=self.options.num_samples, statistics=self.options.statistics)
        check_device(self.device)
        check_choice("--dtype", self.dtype, DTYPES, what="dtype")
        if self.image_column is not None and self.options.scorer in GRADIENT_SCORERS and self.options.measures:
            raise ConfigError("--image-column", f"the {self.options.scorer} scorer takes labelled inputs from --task (e.g. --task scienceqa), not --image-column")

    def __getattr__(self, name: str) -> Any:
        """The options' fields read flat too (``config.ratio``), as before they were nested."""
        if name in OPTION_NAMES:
            return getattr(object.__getattribute__(self, "options"), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def policy_for(self, model_kind: str):
        return self.options.policy_for(model_kind)


def load_samples(config: SelectConfig) -> Any:
    """The selection samples of ``config``: text (``--data`` rendered by column or template),
    image-text (``--image-column``), or the ScienceQA preset's training inputs (``--task scienceqa``)."""
    from lwlora.data import load_text_samples

    options = config.options
    if config.image_column is not None or config.task in IMAGE_TASKS:
        return _image_text_samples(config)
    return load_text_samples(config.data, num_samples=options.num_samples, seed=options.seed, text_column=config.text_column, text_pair_column=config.text_pair_column, template=config.template)


def _image_text_samples(config: SelectConfig) -> Any:
    options = config.options
    if config.task in IMAGE_TASKS:
        if config.image_column is not None or config.text_column is not None or config.template is not None:
            raise ConfigError("--task", f"{config.task} builds its own prompts from its own image column; drop --image-column/--text-column/--template")
        from lwlora.tasks.scienceqa import scienceqa_selection_samples

        return scienceqa_selection_samples(config.data or None, num_samples=options.num_samples, seed=options.seed)
    from lwlora.multimodal import load_image_text_samples

    if config.text_pair_column is not None:
        raise ConfigError("--text-pair-column", "applies to text pairs, not image-text samples")
    return load_image_text_samples(config.data, image_column=config.image_column, num_samples=options.num_samples, seed=options.seed, text_column=config.text_column, template=config.template)


def select_layers(config: SelectConfig, *, model: nn.Module | None = None, tokenizer: Any = None, model_kind: str | None = None, samples: Any = None) -> LayerSelection:
    """Run the whole selection. Pass ``model``/``tokenizer`` to reuse an already loaded model
    (``config.model`` is then only the label recorded in the selection), and ``samples`` to use
    texts prepared elsewhere (e.g. a training task's inputs) instead of reading ``config.data``."""
    from lwlora.models import load_model
    from lwlora.selection.pipeline import select_on_model

    options = config.options
    if options.measures and options.scorer in GRADIENT_SCORERS:
        if model is not None:
            raise ConfigError("--scorer", "gradient scorers need the model with its task head: lwlora.selection.gradients.gradient_selection")
        return select_by_gradients(config)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if samples is None:
        samples = load_samples(config)
    timings["load_data_s"] = time.perf_counter() - start
    gguf_file = config.gguf_file
    if model is None:
        tick = time.perf_counter()
        loader = load_model
        if getattr(samples, "images", None) is not None:
            from lwlora.multimodal import load_vlm as loader
        loaded = loader(config.model, gguf_file=config.gguf_file, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)
        model, tokenizer, model_kind, gguf_file = loaded.model, loaded.tokenizer, loaded.kind, loaded.gguf_file
        timings["load_model_s"] = time.perf_counter() - tick
    elif tokenizer is None:
        raise ValueError("select_layers(model=...) also needs tokenizer=")
    return select_on_model(options, model, tokenizer, samples, model_label=config.model, data_label=config.data or samples.source, model_kind=model_kind, gguf_file=gguf_file, progress=config.progress, timings=timings, start=start)


def select_by_gradients(config: SelectConfig) -> LayerSelection:
    """``lwlora select --scorer fim|gradnorm``: load the model with the task's head and the task's
    labelled inputs (``--task``; default ``classification`` for encoders, ``instruction`` for
    decoders, with ``--label-column`` or ``--instruction-field``/``--output-field``), then score."""
    from transformers import AutoConfig, set_seed

    from lwlora.blocks import resolve_block_stack
    from lwlora.models import infer_model_kind, resolve_device, resolve_model_source
    from lwlora.selection.gradients import gradient_selection
    from lwlora.tasks import load_task
    from lwlora.tasks.base import probe_batches
    from lwlora.training.loading import load_task_model, load_tokenizer

    options = config.options
    source, gguf_file = resolve_model_source(config.model, config.gguf_file)
    task_name = config.task
    if task_name is None:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        kind = infer_model_kind(AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs))
        task_name = "classification" if kind == "encoder" else "instruction"
    tokenizer, source, gguf_file = load_tokenizer(config.model, task=task_name, gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code)
    task = load_task(task_name, tokenizer, data=config.data, text_column=config.text_column, text_pair_column=config.text_pair_column, label_column=config.label_column, instruction_field=config.instruction_field,
                     output_field=config.output_field, max_length=options.max_length, max_train_samples=None, max_eval_samples=1, selection_samples=1, seed=options.seed)
    set_seed(options.seed)  # a fresh classification head is drawn here: seed it, so scores are reproducible
    model = load_task_model(config.model, source, gguf_file, task, tokenizer, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    target, _ = resolve_device(config.device)
    if target is not None:
        model.to(target)
    stack = resolve_block_stack(model, layers_path=options.layers_path, tower=options.tower)
    batches = probe_batches(task, num_samples=options.num_samples, batch_size=options.batch_size, seed=options.seed)
    return gradient_selection(options, model, stack, batches, model_kind=infer_model_kind(model.config), model_label=config.model, data_label=config.data or config.task or task_name, gguf_file=gguf_file, progress=config.progress)


def run(config: SelectConfig, out: str) -> int:
    """``lwlora select``: check ``out`` first, select, write selection.json / scores.csv /
    importance.png there, and print the table and a PEFT snippet."""
    from lwlora.io import check_output_dir
    from lwlora.selection.report import format_table, peft_snippet, write_artifacts
    from lwlora.training.run_dir import CONFIG_FILE

    target = check_output_dir(out, "--out")  # before any compute: an unwritable --out fails now
    if (Path(target) / CONFIG_FILE).is_file():
        raise ConfigError("--out", f"{target} is a training run ({CONFIG_FILE}): its selection.json belongs to that run (and to --resume); write the selection elsewhere")
    selection = select_layers(config)
    paths = write_artifacts(selection, target)
    print(format_table(selection))  # its warnings reached stderr through the lwlora logger already
    print(f"\nwrote {paths['selection']}, {paths['scores']}, {paths['plot']}")
    print("\napply it:\n" + peft_snippet(str(paths["selection"])))
    sys.stdout.flush()
    return 0
