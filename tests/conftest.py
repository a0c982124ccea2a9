"""Shared fixtures: tiny saved checkpoints (BERT encoder, Llama decoder) and small data files.

Everything is built offline from configs and hand-written vocabularies, under a fixed seed; the
checkpoints are session-scoped (built once, a second or two on two CPU cores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# huggingface_hub and datasets read these once, at import time (which may be during collection, or
# inside a session fixture that runs before any function-scoped fixture), so set them here too:
# otherwise a Hub id is tried online first and each such test waits ~20 s on network timeouts.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(_OFFLINE_ENV)

_SUBJECTS = ["the cat", "a dog", "the big bird", "my small fish", "a red fox", "the old man", "a happy child", "the green frog"]
_VERBS = ["sat on", "ran past", "looked at", "jumped over", "slept near"]
_OBJECTS = ["the mat", "a blue car", "the tall tree", "an open door", "the cold river"]
_ENDINGS = ["today", "at night", "in the rain", "with joy", "very fast", "again"]

#: 40 distinct, varied sentences (different lengths, so padding and pooling are exercised).
SENTENCES: list[str] = [
    " ".join(
        part
        for part in (
            _SUBJECTS[i % len(_SUBJECTS)],
            _VERBS[(i * 3) % len(_VERBS)],
            _OBJECTS[(i * 7) % len(_OBJECTS)],
            _ENDINGS[i % len(_ENDINGS)] if i % 3 else "",
            "and then it stopped" if i % 4 == 0 else "",
        )
        if part
    )
    + "."
    for i in range(40)
]
assert len(set(SENTENCES)) == 40

_WORDS = sorted({w.strip(".").lower() for s in SENTENCES for w in s.split()} | {"is", "not", "it", "so", "yes", "no"})


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a small shared CPU the thread pool's
    synchronisation makes each tiny matmul ~500x slower (7 ms instead of 13 us on 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face Hub."""
    for name, value in _OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses; see _one_torch_thread


def _bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = list(dict.fromkeys(specials + chars + pieces + _WORDS))
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})


def _llama_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = list(dict.fromkeys(["<unk>", "<s>", "</s>"] + _WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()")))
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like real Llama tokenizers: BOS/EOS but no pad token (lwlora must pick one).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random BertModel (hidden 32, 3 blocks, 4 heads) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random LlamaModel (hidden 32, 4 blocks) whose tokenizer has BOS/EOS and no pad."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _llama_tokenizer()
    assert tokenizer.pad_token is None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class DataFiles:
    """Paths of the small data files written by the ``data_files`` fixture."""

    root: Path
    jsonl: Path  # 40 records {"text", "label"}
    csv: Path  # 40 rows text,label
    txt: Path  # 40 lines
    pairs: Path  # 40 records {"sentence1", "sentence2", "label"}
    splits: Path  # directory with train.jsonl (40) and validation.jsonl (12)
    texts: tuple[str, ...]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> DataFiles:
    """Small data files in every local layout ``--data`` accepts. Treat them as read-only."""
    import csv

    root = tmp_path_factory.mktemp("data")
    records = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    jsonl = write_jsonl(root / "train.jsonl", records)

    csv_path = root / "rows.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for r in records:
            writer.writerow([r["text"], r["label"]])

    txt = root / "lines.txt"
    txt.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")

    pairs = write_jsonl(
        root / "pairs.jsonl",
        [{"sentence1": s, "sentence2": SENTENCES[(i + 1) % 40], "label": i % 3} for i, s in enumerate(SENTENCES)],
    )

    splits = root / "splits"
    splits.mkdir()
    write_jsonl(splits / "train.jsonl", records)
    write_jsonl(splits / "validation.jsonl", [{"text": "validation " + s, "label": 0} for s in SENTENCES[:12]])

    return DataFiles(root=root, jsonl=jsonl, csv=csv_path, txt=txt, pairs=pairs, splits=splits, texts=tuple(SENTENCES))
