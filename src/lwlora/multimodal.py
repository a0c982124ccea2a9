"""Vision-language models (LLaVA-1.5, LLaVA-NeXT, Gemma 3, any ``AutoModelForImageTextToText``):
images for the samples, and the model's own processor to turn image + text into model inputs.

The paper's third experiment (Ogawa et al., arXiv 2602.05988) fine-tunes LLaVA-1.5-7B on ScienceQA
with LoRA on the CKA-selected blocks of the *language* model. Here:

- a sample is one image and one user message (and, for selection on training data, the response
  that follows it); images are PIL images, file paths (relative paths resolve against the data
  file's directory) or a ``datasets`` ``Image`` column (decoded or ``{"bytes", "path"}``);
- the text the model sees is the processor's chat template when it has one, else LLaVA-1.5's
  ``USER: <image>\\n{message} ASSISTANT:``; the processor expands the image placeholder into the
  image tokens (LLaVA: one per patch), so the language tower's attention mask covers text *and*
  image tokens;
- samples are never truncated: cutting the sequence could drop image tokens, which the model
  rejects. Training checks ``--max-length`` instead (see :class:`ImageTextCollator`).

The processor stands in for the tokenizer wherever lwlora passes one around (``processor.tokenizer``
is the text tokenizer): selection, training and evaluation take it unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lwlora.errors import ConfigError

#: LLaVA-1.5's conversation format, used when the processor has no chat template.
FALLBACK_TEMPLATE = "USER: {image}\n{text} ASSISTANT:"


def text_tokenizer(processor: Any) -> Any:
    """The text tokenizer of a multimodal processor (a tokenizer is returned unchanged)."""
    return getattr(processor, "tokenizer", processor)


def is_processor(obj: Any) -> bool:
    """Whether ``obj`` is a multimodal processor (has an image processor), not a bare tokenizer."""
    return getattr(obj, "image_processor", None) is not None


# ---------------------------------------------------------------------------------------------
# Images


def data_base_dir(spec: str | None) -> Path | None:
    """The directory that relative image paths of a local ``--data`` spec resolve against: the
    file's directory, or the directory of splits (``DIR`` or ``DIR:split``). None for Hub data."""
    if not spec:
        return None
    path = Path(spec)
    if not path.exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).is_dir():
        path = Path(spec.rsplit(":", 1)[0])
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        return path.resolve().parent
    return None


def resolve_image_ref(value: Any, base_dir: Path | None, *, flag: str, where: str) -> Any:
    """Check an image reference without decoding it: a path string becomes an absolute path that
    must exist; PIL images and ``{"bytes", "path"}`` dicts pass. Raises ``ConfigError`` naming
    ``flag`` for a missing value or file."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(flag, f"{where} has no image (text-only samples cannot be run through a vision-language model; drop them)")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError("--data", f"{where}: image file not found: {path}")
        return str(path)
    if isinstance(value, dict):
        if value.get("bytes") is None and not value.get("path"):
            raise ConfigError(flag, f"{where} has an empty image")
        return value
    if _is_pil(value):
        return value
    raise ConfigError(flag, f"{where}: expected an image path, a PIL image or an image column, got {type(value).__name__}")


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with transformers' vision extras
        return False
    return isinstance(value, Image.Image)


def load_image(value: Any, *, where: str = "image") -> Any:
    """An RGB ``PIL.Image`` from a PIL image, a path, or a ``{"bytes", "path"}`` dict."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if _is_pil(value):
            image = value
        elif isinstance(value, dict):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
        else:
            image = Image.open(value)
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError("--data", f"{where}: cannot read image {value if isinstance(value, (str, Path)) else ''}: {type(exc).__name__}".rstrip()) from None


def image_digest(image: Any) -> str:
    """A short content hash of an image (its RGB pixels and size)."""
    pil = load_image(image)
    digest = hashlib.sha256(f"{pil.size}".encode())
    digest.update(pil.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ImageTextSamples:
    """Selection samples with one image each: ``texts[i]`` is the user message about
    ``images[i]``; ``responses[i]`` (optional) is appended after the model's prompt, as the
    reference decoder scripts append the response. ``fingerprint`` covers texts and pixels."""

    texts: list[str]
    images: list[Any]
    source: str
    fingerprint: str
    responses: list[str] | None = None

    #: never sentence pairs; present so that code written for ``TextSamples`` reads it
    text_pairs: None = None

    def __len__(self) -> int:
        return len(self.texts)


def make_image_text_samples(texts: list[str], images: list[Any], *, source: str, responses: list[str] | None = None) -> ImageTextSamples:
    payload = json.dumps({"texts": texts, "responses": responses, "images": [image_digest(i) for i in images]}, ensure_ascii=False)
    return ImageTextSamples(texts=texts, images=images, source=source, fingerprint="sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest(), responses=responses)


def load_image_text_samples(spec: str, *, image_column: str, num_samples: int = 128, seed: int = 0, text_column: str | None = None, template: str | None = None) -> ImageTextSamples:
    """Draw ``num_samples`` records of ``spec`` (as :func:`lwlora.data.load_text_samples` does)
    with their image in ``image_column``: a path (relative to the data file), or an image column."""
    import random

    from lwlora.data import load_sample_records, resolve_columns

    records, columns = load_sample_records(spec, num_samples)
    if image_column not in columns:
        raise ConfigError("--image-column", f"column {image_column!r} not found; the data has {columns}")
    text_columns = [c for c in columns if c != image_column]
    text_column, _, template = resolve_columns(text_columns, text_column, None, template)
    records = undecoded_images(records, image_column)
    indices = list(range(len(records)))
    if num_samples < len(records):
        indices = sorted(random.Random(seed).sample(indices, num_samples))
    base = data_base_dir(spec)
    texts, images = [], []
    for i in indices:
        record = records[i]
        text = template.format(**record) if template is not None else record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("--template" if template is not None else "--text-column", f"record {i} of {spec} has no text (got {text!r})")
        texts.append(text)
        images.append(resolve_image_ref(record.get(image_column), base, flag="--image-column", where=f"record {i} of {spec}"))
    return make_image_text_samples(texts, images, source=spec)


def undecoded_images(records: Any, column: str) -> Any:
    """``records`` with a ``datasets.Image`` column left undecoded (``{"bytes", "path"}``), so
    that filtering and sampling do not decode every image."""
    features = getattr(records, "features", None)
    if features is None or column not in features:
        return records
    import datasets

    if isinstance(features[column], datasets.Image) and features[column].decode:
        return records.cast_column(column, datasets.Image(decode=False))
    return records


# ---------------------------------------------------------------------------------------------
# Prompts and batches


def build_prompt(processor: Any, text: str) -> str:
    """The prompt for one image and one user message ``text``, ending where the model's answer
    starts: the processor's chat template (generation prompt added) when it has one, else
    :data:`FALLBACK_TEMPLATE` with the processor's image placeholder."""
    tokenizer = text_tokenizer(processor)
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = getattr(tokenizer, "bos_token", None)
        # The processor's tokenizer adds BOS itself; a template that writes it would double it.
        return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
    placeholder = getattr(processor, "image_token", None)
    if not placeholder:
        raise ConfigError("MODEL", f"{type(processor).__name__} has no image token and no chat template; lwlora cannot place the image in the prompt")
    return FALLBACK_TEMPLATE.format(image=placeholder, text=text)


@contextmanager
def padding_side(processor: Any, side: str):
    tokenizer = text_tokenizer(processor)
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def encode(processor: Any, prompts: Sequence[str], images: Sequence[Any], *, side: str = "right") -> dict[str, torch.Tensor]:
    """Processor inputs for ``prompts`` (one image each), padded on ``side``: ``input_ids`` and
    ``attention_mask`` (B, T) with the image placeholders expanded, ``pixel_values`` and whatever
    else the model family needs (``image_sizes`` for LLaVA-NeXT, ``token_type_ids`` for Gemma 3)."""
    pil = [[load_image(image, where=f"sample {i}")] for i, image in enumerate(images)]
    with padding_side(processor, side):
        try:
            encoded = processor(images=pil, text=list(prompts), padding=True, return_tensors="pt")
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError("MODEL", f"the {type(processor).__name__} rejected the inputs: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return dict(encoded)


def image_text_batches(processor: Any, samples: ImageTextSamples, *, batch_size: int, model: Any = None) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Model inputs for ``samples`` in batches of similar text length (less padding), right-padded,
    and the sample order used (row j of the concatenated batches is sample ``order[j]``)."""
    from lwlora.batching import forward_keys as _forward_keys

    texts = [build_prompt(processor, t) + (samples.responses[i] if samples.responses else "") for i, t in enumerate(samples.texts)]
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    accepted = _forward_keys(model) if model is not None else None
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        encoded = encode(processor, [texts[i] for i in chunk], [samples.images[i] for i in chunk])
        batches.append({k: v for k, v in encoded.items() if accepted is None or k in accepted})
    return batches, order


# ---------------------------------------------------------------------------------------------
# Training batches


class ImageTextCollator:
    """Batches of ``{"prompt", "answer", "image"}`` examples for causal-LM training of a VLM.

    The processor encodes prompt + image (placeholders expanded); the answer's tokens and EOS are
    appended; ``labels`` are the answer tokens and EOS, -100 on the prompt, image tokens and
    padding (loss on the response only, as the instruction tasks do). Text-aligned extras
    (``token_type_ids`` of Gemma 3) are extended with 0 over the answer; image tensors
    (``pixel_values``, ``image_sizes``) pass through. Right padding.

    Raises ``ConfigError(--max-length)`` when a prompt with its image tokens leaves no room for
    the answer: truncating would cut image tokens.
    """

    def __init__(self, processor: Any, max_length: int, label_pad_id: int = -100):
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.max_length = max_length
        self.label_pad_id = label_pad_id

    def answer_ids(self, answer: str) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [build_prompt(self.processor, f["prompt"]) for f in features]
        encoded = encode(self.processor, prompts, [f["image"] for f in features], side="right")
        ids, mask = encoded.pop("input_ids"), encoded.pop("attention_mask")
        aligned = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape == ids.shape}
        rows: list[tuple[list[int], list[int], dict[str, list[int]]]] = []
        for b, feature in enumerate(features):
            length = int(mask[b].sum())
            answer = self.answer_ids(feature["answer"])
            if length >= self.max_length:
                raise ConfigError("--max-length", f"a prompt with its image tokens is {length} tokens, max_length={self.max_length} leaves no room for the answer; raise --max-length")
            keep = min(len(answer), self.max_length - length)
            row_ids = ids[b, :length].tolist() + answer[:keep]
            labels = [self.label_pad_id] * length + answer[:keep]
            extras = {k: v[b, :length].tolist() + [0] * keep for k, v in aligned.items()}
            rows.append((row_ids, labels, extras))
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id

        def padded(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        batch = {
            "input_ids": torch.tensor([padded(r[0], pad) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([padded([1] * len(r[0]), 0) for r in rows], dtype=torch.long),
            "labels": torch.tensor([padded(r[1], self.label_pad_id) for r in rows], dtype=torch.long),
        }
        for key, tensor in aligned.items():
            batch[key] = torch.tensor([padded(r[2][key], 0) for r in rows], dtype=tensor.dtype)
        batch.update({k: v for k, v in encoded.items() if k not in aligned})
        return batch


# ---------------------------------------------------------------------------------------------
# Loading


def load_processor(source: str, *, trust_remote_code: bool = False, flag: str = "MODEL") -> Any:
    """The model's ``AutoProcessor``; it must handle images (a text-only model gives an error)."""
    from transformers import AutoProcessor

    from lwlora.models import prepare_tokenizer

    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here is an unloadable MODEL
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(flag, f"cannot load a processor from {source!r}: {type(exc).__name__}: {first}") from None
    if not is_processor(processor):
        raise ConfigError(flag, f"{source!r} has no image processor: it is not a vision-language model (image tasks and --image-column need one)")
    prepare_tokenizer(processor)
    return processor


def load_vlm(model_id: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, gguf_file: str | None = None):
    """The bare VLM (``AutoModel``: both towers, no LM head) and its processor, for selection.
    Returns a :class:`lwlora.models.LoadedModel` whose ``tokenizer`` is the processor."""
    from transformers import AutoModel

    from lwlora.models import (
        DTYPES,
        LoadedModel,
        infer_model_kind,
        resolve_device,
        resolve_model_source,
    )

    if gguf_file is not None:
        raise ConfigError("--gguf-file", "image samples need a transformers checkpoint with a processor, not a GGUF file")
    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    source, _ = resolve_model_source(model_id, None)
    target_device, device_map = resolve_device(device)
    processor = load_processor(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModel.from_pretrained(source, dtype=DTYPES[dtype], device_map=device_map, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("MODEL", f"cannot load {model_id!r}: {type(exc).__name__}: {first}") from None
    if device_map is None and target_device is not None:
        model.to(target_device)
    return LoadedModel(model=model, tokenizer=processor, kind=infer_model_kind(model.config), source=model_id, gguf_file=None)
