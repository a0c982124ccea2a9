"""Loading what a run trains: the tokenizer (or processor) and the model with its task's head."""

from __future__ import annotations

from typing import Any

from torch import nn

from lwlora.errors import ConfigError


def load_tokenizer(model: str, *, task: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> tuple[Any, str, str | None]:
    """(tokenizer — or, for image tasks, the model's processor —, the model's source path or Hub
    id, its GGUF file) for MODEL; an unloadable one is a ``MODEL`` ConfigError."""
    from transformers import AutoTokenizer

    from lwlora.models import prepare_tokenizer, resolve_model_source
    from lwlora.tasks.presets import IMAGE_TASKS

    source, gguf_file = resolve_model_source(model, gguf_file)
    if task in IMAGE_TASKS:  # the model's processor stands in for the tokenizer
        from lwlora.multimodal import load_processor

        if gguf_file:
            raise ConfigError("--gguf-file", f"{task} needs a transformers checkpoint with a processor, not a GGUF file")
        return load_processor(source, trust_remote_code=trust_remote_code), source, None
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("MODEL", f"cannot load a tokenizer from {model!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return prepare_tokenizer(tokenizer), source, gguf_file


def load_task_model(model_label: str, source: str, gguf_file: str | None, task: Any, tokenizer: Any, *, dtype: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model at ``source`` with the head ``task`` needs: sequence classification/regression,
    causal LM, or image-text-to-text (a vision-language model) for image tasks. A newly
    initialised module outside the blocks (a pooler the checkpoint lacks) is listed in
    ``model.lwlora_new_head_modules``. ``model_label``: MODEL as the user gave it (for errors)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    from lwlora.models import DTYPES, forget_gguf_quantization

    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        if getattr(task, "processor", None) is not None:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        elif task.kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            extra: dict[str, Any] = {"num_labels": task.num_labels}
            if task.kind == "regression":
                extra["problem_type"] = "regression"
            elif task.label_names:
                extra["id2label"] = dict(enumerate(task.label_names))
                extra["label2id"] = {name: i for i, name in enumerate(task.label_names)}
            model, loading = AutoModelForSequenceClassification.from_pretrained(source, **kwargs, **extra, output_loading_info=True)
            model.lwlora_new_head_modules = newly_initialized_modules(model, loading.get("missing_keys", ()))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("MODEL", f"cannot load {model_label!r} for {task.kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if gguf_file:
        forget_gguf_quantization(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id
    return model


#: the heads PEFT's SEQ_CLS task type trains in full already
PEFT_SEQ_CLS_HEADS = ("classifier", "score")


def newly_initialized_modules(model: nn.Module, missing_keys: Any) -> tuple[str, ...]:
    """Modules outside the block stack whose weights the checkpoint lacked (randomly initialised:
    a pooler, a pre-classifier), other than the head PEFT trains anyway. A random layer that stays
    frozen between the blocks and the classifier only hurts, so these are trained in full.

    ``missing_keys``: parameter names from ``from_pretrained(..., output_loading_info=True)``."""
    from lwlora.blocks import find_block_stacks

    stacks = [stack.path + "." for stack in find_block_stacks(model)]
    parameters = {name for name, _ in model.named_parameters()}
    modules = []
    for key in sorted(missing_keys):
        path = key.rsplit(".", 1)[0] if "." in key else ""
        # parameters only (a missing buffer is not a random layer), outside the blocks
        if not path or key not in parameters or any(key.startswith(prefix) for prefix in stacks):
            continue
        if any(path == head or path.startswith(head + ".") or path.endswith("." + head) for head in PEFT_SEQ_CLS_HEADS):
            continue
        modules.append(path)
    return tuple(dict.fromkeys(modules))
