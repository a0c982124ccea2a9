"""Generation-based evaluation: answer matching, code programs, batched greedy decoding."""

from __future__ import annotations

import pytest
import torch

from lwlora.evaluation.answers import math_answer_matches, normalise_math_answer
from lwlora.evaluation.generation import (
    choose_by_loglik,
    code_program,
    evaluate_examples,
    generate_greedy,
)
from lwlora.tasks import EvalExample


@pytest.mark.parametrize(
    "generation, reference, correct",
    [
        ("48 + 24 = 72\n#### 72", "72", True),
        ("The answer is 1,234.", "1234", True),
        ("#### 71", "72", False),
        ("so the result is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", True),
        ("\\boxed{\\left( 3, 4 \\right)}", "(3,4)", True),
        ("\\boxed{(4, 3)}", "(3,4)", False),
        ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
        ("no boxed answer here: (3,4)", "(3,4)", False),
        ("\\boxed{90^\\circ}", "90", True),
    ],
)
def test_math_answer_matches(generation, reference, correct):
    assert math_answer_matches(generation, reference)[1] is correct


def test_normalise_math_answer():
    assert normalise_math_answer(" $\\left( \\tfrac{1}{2}, 3 \\right)$ .") == "(\\frac{1}{2},3)"


HUMANEVAL_LIKE = EvalExample(
    prompt="...", reference="def check(candidate):\n    assert candidate(2) == 4\n", kind="code", entry_point="double", code_prompt="import math\ndef double(x):\n    \"\"\"Twice x.\"\"\"\n"
)


@pytest.mark.parametrize(
    "completion",
    ["    return 2 * x\n", "```python\ndef double(x):\n    return x * 2\n```\nThis doubles x.", "def double(x):\n    return math.prod([x, 2])\n"],
)
def test_code_program_runs_completions_and_whole_functions(completion):
    from lwlora.evaluation.sandbox import run_python

    assert run_python(code_program(HUMANEVAL_LIKE, completion), timeout_s=10).passed


def test_code_program_fails_wrong_code_and_runs_bare_assertions():
    from lwlora.evaluation.sandbox import run_python

    assert not run_python(code_program(HUMANEVAL_LIKE, "    return x + 1\n"), timeout_s=10).passed
    mbpp = EvalExample(prompt="...", reference="\nassert add(2, 3) == 5", kind="code")
    assert "check(" not in code_program(mbpp, "def add(a, b):\n    return a + b\n")
    assert run_python(code_program(mbpp, "def add(a, b):\n    return a + b\n"), timeout_s=10).passed


def test_mbpp_and_math500_records_become_examples():
    from lwlora.tasks.instruction import math500_examples, mbpp_examples

    mbpp = mbpp_examples([{"prompt": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_imports": []}], None)
    assert mbpp[0].kind == "code" and "assert add(1, 2) == 3" in mbpp[0].prompt and mbpp[0].reference.count("assert") == 2
    math = math500_examples([{"problem": "What is 1/2 + 1/2?", "answer": "1"}, {"problem": "p", "answer": "\\frac{1}{3}"}], 1)
    assert len(math) == 1 and math[0].reference == "1" and "1/2 + 1/2" in math[0].prompt


def test_secondary_hub_evaluation_is_skipped_offline(monkeypatch, caplog):
    from lwlora.tasks.instruction import optional_hub_examples

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert optional_hub_examples("google-research-datasets/mbpp-does-not-exist", lambda records: ["never"], split="test") == []
    assert "skipping" in caplog.text


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lwlora.models import prepare_tokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_batched_greedy_generation_matches_one_by_one(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["the cat sat on", "a dog", "the big bird looked at the tall tree and"]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=5, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_evaluate_examples_scores_each_kind(tiny_lm):
    model, tokenizer = tiny_lm
    math = [EvalExample(prompt="the cat sat", reference="3", kind="math")] * 2
    result = evaluate_examples(model, tokenizer, math, max_new_tokens=3, progress=False)
    assert result["metrics"]["n"] == 2 and result["metrics"]["exact_match"] in (0.0, 1.0) and len(result["records"]) == 2
    choice = [EvalExample(prompt="pick one:", reference="B", kind="choice", choices=["x", "y"])]
    loglik = evaluate_examples(model, tokenizer, choice, choice_mode="loglik", progress=False)
    assert loglik["records"][0]["prediction"] == choose_by_loglik(model, tokenizer, "pick one:", 2) in ("A", "B")
    with pytest.raises(ValueError, match="one kind"):
        evaluate_examples(model, tokenizer, math + choice, progress=False)


def _char_tokenizer():
    """One token per character (" A" is two tokens: " " and "A"), as SentencePiece splits "▁" + "A"."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>", "</s>"] + list(" abcdefghijklmnopqrstuvwxyzABCDE:.?")
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def test_loglik_choice_scores_multi_token_letters_against_a_float64_reference():
    """Each letter's forms are scored over all their tokens: with a character tokenizer the first
    token of every " A"/" B"/... is the same space, so a first-token rule could only ever answer A."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lwlora.evaluation.generation import LETTER_FORMS

    tokenizer = _char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).double().eval()
    answers = []
    for prompt in ["what is it? answer:", "pick: ", "abc.", "the end", "question: which one", "zz"]:
        reference = []
        for letter in "ABCD":
            total = []
            for form in LETTER_FORMS:
                ids = tokenizer(prompt + form.format(upper=letter, lower=letter.lower()), return_tensors="pt")["input_ids"]
                n_prompt = len(tokenizer(prompt)["input_ids"])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0], dim=-1)
                total.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(n_prompt, ids.shape[1])))
            reference.append(torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0))
        expected = "ABCD"[int(torch.argmax(torch.stack(reference)))]
        assert choose_by_loglik(model, tokenizer, prompt, 4) == expected
        answers.append(expected)
    assert set(answers) != {"A"}  # the prompts exercise more than the first letter
