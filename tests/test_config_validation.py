"""Configs refuse bad values before anything is loaded or written: YAML values are typed and
converted from the dataclass field types, every choice-valued option is checked, and
``TrainConfig`` refuses what ``SelectConfig`` refuses for the selection options they share
(lwlora.selection.options, lwlora.fields). Also a guard on pyproject's declared dependencies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import write_jsonl

from lwlora import cli
from lwlora.configs import list_configs, load_config
from lwlora.errors import ConfigError
from lwlora.commands.select import SelectConfig
from lwlora.training.config import TrainConfig

REQUIRED = {"model": "m", "task": "classification", "out": "o"}


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**REQUIRED, **overrides})


def select_config(**overrides) -> SelectConfig:
    return SelectConfig(**{"model": "m", "data": "d", **overrides})


def config_error(build, **overrides) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(**overrides)
    assert "\n" not in str(info.value)
    return info.value


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-validation")
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(16)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:4])
    return root


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def no_loading(monkeypatch):
    """A bad option must be refused before any tokenizer or model is loaded."""
    from lwlora.training import loading

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a tokenizer or model before checking the options")

    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    monkeypatch.setattr(loading, "load_task_model", refuse)


# ------------------------------------------------------------------------------ value types


def test_yaml_strings_become_the_field_types():
    """PyYAML reads ``2e-4`` (no dot) as a string; a quoted "no" is a non-empty, truthy string."""
    config = TrainConfig.from_dict({**REQUIRED, "lr": "2e-4", "bf16": "no", "fp16": "YES", "max_steps": "10", "epochs": 2, "warmup": "0.1"}, source="c.yaml")
    assert config.lr == 2e-4 and type(config.lr) is float
    assert config.bf16 is False and config.fp16 is True
    assert config.max_steps == 10 and type(config.max_steps) is int
    assert config.epochs == 2.0 and type(config.epochs) is float  # an int where a float is expected
    assert config.warmup == 0.1


def test_python_callers_get_the_same_conversion():
    config = train_config(lr="2e-4", gradient_checkpointing="off", r="4", out=Path("runs/x"))
    assert (config.lr, config.gradient_checkpointing, config.r, config.out) == (2e-4, False, 4, "runs/x")
    assert json.loads(json.dumps(config.to_json()))["lr"] == 2e-4  # train_config.json holds a number


def test_an_integral_float_is_an_integer_but_a_fraction_is_not():
    """Documented choice: 3.0 (or "1e3") for an int field is that integer; 2.5 is refused."""
    assert train_config(max_steps=3.0).max_steps == 3 and train_config(max_steps="1e3").max_steps == 1000
    error = config_error(train_config, max_steps=2.5)
    assert (error.flag, error.message) == ("--max-steps", "expected an integer, got 2.5")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_steps", 2.5, "expected an integer, got 2.5"),
        ("batch_size", "four", "expected an integer, got 'four'"),
        ("r", True, "expected an integer, got True"),  # True is an int to Python, not to a config
        ("lr", "fast", "expected a number, got 'fast'"),
        ("lr", float("inf"), "expected a finite number, got inf"),
        ("bf16", "maybe", "expected true or false (or yes/no, on/off, 1/0), got 'maybe'"),
        ("bf16", 2, "expected true or false (or yes/no, on/off, 1/0), got 2"),
        ("data", 3, "expected a string, got 3"),
        ("method", "adalora", "unknown choice 'adalora'; choose one of lora, pissa, dora, rslora, olora, eva, full"),
        ("num_samples", None, "expected an integer, got None"),
    ],
)
def test_a_bad_yaml_value_is_one_line_naming_the_file_and_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({**REQUIRED, key: value}, source="c.yaml")
    assert (info.value.flag, info.value.message) == ("--config", f"c.yaml: {key}: {message}")


def test_select_config_fields_are_typed_too():
    config = select_config(num_samples="16", layers=[0, 2], include=[1], trust_remote_code="false")
    assert (config.num_samples, config.layers, config.include, config.trust_remote_code) == (16, (0, 2), (1,), False)
    assert config_error(select_config, num_samples=8.5).flag == "--num-samples"
    assert config_error(select_config, layers=(0, "x")).flag == "--layers"


# ------------------------------------------------------------------- choices, shared checks

#: (SelectConfig overrides, TrainConfig overrides, flag): a value both configs must refuse alike.
SHARED_BAD = [
    ({"pooling": "bogus"}, {"pooling": "bogus"}, "--pooling"),
    ({"feature_norm": "x"}, {"feature_norm": "x"}, "--feature-norm"),
    ({"degenerate_fallback": "y"}, {"degenerate_fallback": "y"}, "--degenerate-fallback"),
    ({"preset": "z"}, {"preset": "z"}, "--preset"),
    ({"scorer": "nope"}, {"scorer": "nope"}, "--scorer"),
    ({"scorer": "fim", "feature_norm": "standardize"}, {"layers": "fim", "feature_norm": "standardize"}, "--feature-norm"),
    ({"scorer": "bi", "feature_norm": "standardize"}, {"layers": "bi", "feature_norm": "standardize"}, "--feature-norm"),
    ({"scorer": "cka-debiased", "num_samples": 3}, {"layers": "cka-debiased", "num_samples": 3}, "--num-samples"),
    ({"scorer": "cka-debiased", "num_samples": 3}, {"scorer": "cka-debiased", "num_samples": 3}, "--num-samples"),
    ({"prefer_shallow": 1.0}, {"prefer_shallow": 1.0}, "--prefer-shallow"),
    ({"prefer_shallow": -0.1}, {"prefer_shallow": -0.1}, "--prefer-shallow"),
    ({"param_budget": 0.0}, {"param_budget": 0.0}, "--param-budget"),
    ({"ratio": 0.5, "param_budget": 0.5}, {"ratio": 0.5, "param_budget": 0.5}, "--param-budget"),
    ({"num_layers": 2, "auto": True}, {"num_layers": 2, "auto": True}, "--auto"),
    ({"statistics": "covariance", "scorer": "bi"}, {"statistics": "covariance", "layers": "bi"}, "--statistics"),
    ({"dtype": "float8"}, {"dtype": "float8"}, "--dtype"),
    ({"device": "gpu"}, {"device": "gpu"}, "--device"),
    ({"device": "cuda:x"}, {"device": "cuda:x"}, "--device"),
    ({"target_modules": " , "}, {"target_modules": " , "}, "--target-modules"),
]


@pytest.mark.parametrize("select_overrides, train_overrides, flag", SHARED_BAD)
def test_train_config_refuses_what_select_config_refuses(select_overrides, train_overrides, flag):
    assert config_error(select_config, **select_overrides).flag == flag
    assert config_error(train_config, **train_overrides).flag == flag


def test_shared_values_both_accept():
    for overrides in ({"pooling": "mean"}, {"feature_norm": "standardize"}, {"device": "cuda:1"}, {"dtype": "bf16"}, {"prefer_shallow": 0.0}, {"param_budget": 0.25}, {"auto": True}):
        select_config(**overrides)
        train_config(**overrides)


@pytest.mark.parametrize("scorer", ["fim", "gradnorm", "all"])
def test_train_scorer_must_be_a_similarity(scorer):
    """``--layers cka --scorer fim`` reached select_layers' ValueError; the train-side form is ``--layers fim``."""
    error = config_error(train_config, layers="cka", scorer=scorer)
    assert error.flag == "--scorer" and f"--layers {scorer}" in error.message
    train_config(layers=scorer)


@pytest.mark.parametrize("alpha", [0, -16])
def test_alpha_must_be_positive(alpha):
    assert config_error(train_config, alpha=alpha).flag == "--alpha"
    assert train_config(alpha=None).alpha is None and train_config(alpha=8).alpha == 8.0


def test_repeated_blocks_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lwlora"):
        assert train_config(layers="1,1,2").layers == "1,2"
        assert select_config(layers=(3, 1, 3)).layers == (3, 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lwlora"]
    assert len(warnings) == 2 and all("--layers" in w and "more than once" in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lwlora"):
        train_config(layers="0,2")
    assert not caplog.records


@pytest.mark.parametrize("bootstrap, ok", [(0, True), (1, False), (2, True), (-1, False)])
def test_bootstrap_needs_two_replicates(bootstrap, ok):
    if ok:
        assert select_config(bootstrap=bootstrap).bootstrap == bootstrap
    else:
        assert config_error(select_config, bootstrap=bootstrap).flag == "--bootstrap"


def test_the_tables_restated_without_torch_agree_with_their_owners():

    from lwlora import models
    from lwlora.selection import capture, gradients, scoring
    from lwlora.selection import options as options_checks
    from lwlora.selection.policy import RULES
    from lwlora.blocks import TOWERS

    assert {name: (s.min_samples, isinstance(s, scoring.CKAScorer), scoring.uses_statistics(s)) for name, s in scoring.SCORERS.items()} == {
        name: (f.min_samples, f.cka, f.streams) for name, f in options_checks.SIMILARITY_SCORERS.items()
    }
    assert options_checks.GRADIENT_SCORERS == tuple(gradients.GRADIENT_SCORERS)
    assert options_checks.ALL_SCORERS == (*scoring.SCORERS, *gradients.GRADIENT_SCORERS, *RULES)
    assert options_checks.POOLINGS == capture.POOLINGS and options_checks.STATISTICS == capture.STATISTICS
    assert options_checks.FEATURE_NORMS == scoring.FEATURE_NORMS
    assert set(options_checks.DTYPES) == set(models.DTYPES)
    assert options_checks.TOWER_NAMES == TOWERS


def test_train_config_needs_no_torch():
    import subprocess
    import sys

    code = "import sys; from lwlora.training.config import TrainConfig; TrainConfig(model='m', task='t', out='o', statistics='covariance', lr='1e-4'); assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_shipped_config_builds_with_typed_values():
    import dataclasses
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for name in list_configs():
        data, source = load_config(name)
        config = TrainConfig.from_dict(data, source=source)
        for f in dataclasses.fields(config):
            value, hint = getattr(config, f.name), hints[f.name]
            if hint in (int, float, bool, str):
                assert type(value) is hint, (name, f.name, value)


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize(
    "line, message",
    [
        ("max_steps: 2.5", "max_steps: expected an integer, got 2.5"),
        ("batch_size: four", "batch_size: expected an integer, got 'four'"),
        ("bf16: maybe", "bf16: expected true or false"),
        ("lr: fast", "lr: expected a number, got 'fast'"),
        ("pooling: bogus", "pooling: unknown choice 'bogus'; choose one of cls, last, mean"),
        ("feature_norm: x", "feature_norm: unknown choice 'x'; choose one of none, standardize"),
        ("degenerate_fallback: y", "degenerate_fallback: unknown choice 'y'; choose one of exclude, mean"),
        ("preset: z", "preset: unknown choice 'z'; choose one of paper, recommended"),
        ("preset: recommended", "layers: does not combine with --preset recommended (it adapts every block)"),
        ("scorer: fim", "scorer: fim is a gradient scorer: use --layers fim"),
        ("alpha: 0", "alpha: must be positive"),
        ("device: gpu", "device: unknown device 'gpu'"),
    ],
)
def test_lwlora_run_bad_yaml_value_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, cls_dir, tmp_path, capsys, no_loading, line, message):
    out = tmp_path / "run"
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {tiny_bert_dir}\ntask: classification\ndata: {cls_dir}\nout: {out}\nlayers: last\nnum_layers: 1\nmax_steps: 1\ndevice: cpu\n{line}\n")
    assert cli.main(["run", "--config", str(path), "--no-progress"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"lwlora run: error: --config: {path}: {message}"), err
    assert not out.exists()


def test_lwlora_run_max_steps_message_is_exact(tiny_bert_dir, tmp_path, capsys, no_loading):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {tiny_bert_dir}\ntask: classification\nout: {tmp_path / 'run'}\nmax_steps: 2.5\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    assert stderr_lines(capsys) == [f"lwlora run: error: --config: {path}: max_steps: expected an integer, got 2.5"]
    assert not (tmp_path / "run").exists()


def train_argv(model, data, out, *extra):
    return ["train", str(model), "--task", "classification", "--data", str(data), "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--max-length", "24", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--max-steps", "2.5"], "--max-steps: expected an integer, got '2.5'"),
        (["--layers", "cka", "--scorer", "fim"], "--scorer: fim is a gradient scorer"),
        (["--alpha", "0"], "--alpha: must be positive"),
        (["--pooling", "bogus"], "--pooling"),
        (["--feature-norm", "x"], "--feature-norm"),
        (["--degenerate-fallback", "y"], "--degenerate-fallback"),
        (["--preset", "z"], "--preset"),
        (["--preset", "recommended", "--ratio", "1.5"], "--ratio: with --preset recommended"),
        (["--preset", "recommended", "--budget-from-ratio", "0.5"], "--budget-from-ratio: does not combine with --preset recommended"),
        (["--preset", "recommended", "--layers", "cka"], "--layers: does not combine with --preset recommended"),
        (["--preset", "recommended", "--method", "full"], "--method: full does not combine with --preset recommended"),
        (["--preset", "recommended", "--rank-allocation", "importance"], "--rank-allocation: importance does not combine"),
        (["--scorer", "nope"], "--scorer"),
        (["--layers", "fim", "--feature-norm", "standardize"], "--feature-norm"),
        (["--layers", "cka-debiased", "--num-samples", "3"], "--num-samples"),
        (["--prefer-shallow", "1"], "--prefer-shallow"),
        (["--param-budget", "0"], "--param-budget"),
        (["--ratio", "0.5", "--param-budget", "0.5"], "--param-budget: give only one of --ratio, --param-budget"),
        (["--num-layers", "1", "--auto"], "--auto"),
        (["--dtype", "float8"], "--dtype"),
        (["--device", "gpu"], "--device"),
    ],
)
def test_lwlora_train_bad_flag_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, cls_dir, tmp_path, capsys, no_loading, extra, flag):
    out = tmp_path / "run"
    assert cli.main(train_argv(tiny_bert_dir, cls_dir, out, *extra)) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"lwlora train: error: {flag}"), err
    assert not out.exists()


def test_lwlora_select_bootstrap_1_is_one_line_exit_2(tiny_bert_dir, data_files, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--num-samples", "8", "--bootstrap", "1", "--device", "cpu", "--no-progress"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("lwlora select: error: --bootstrap"), err
    assert not out.exists()


@pytest.mark.parametrize("name, value", [("num_layers", 2), ("param_budget", 0.5), ("auto", True), ("include", (0,)), ("exclude", (1,)),
                                         ("selection", "sel.json"), ("dynamic_blocks", 0.5), ("granularity", "sublayer")])
def test_the_recommended_preset_refuses_what_it_sets_itself(name, value):
    with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')}: .*--preset recommended"):
        TrainConfig(model="m", task="classification", out="o", preset="recommended", **{name: value})


@pytest.mark.parametrize("command", ["select", "compare"])
def test_the_commands_that_choose_blocks_refuse_the_training_preset(tiny_bert_dir, data_files, tmp_path, capsys, command):
    out = tmp_path / "sel"
    assert cli.main([command, str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--preset", "recommended", "--device", "cpu", "--no-progress"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"lwlora {command}: error: --preset: recommended is a training mode"), err
    assert not out.exists()


@pytest.mark.parametrize("command, listed", [("select", "{paper}"), ("compare", "{paper}"), ("train", "{paper,recommended}")])
def test_preset_usage_lists_what_the_command_accepts(capsys, command, listed):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"--preset {listed}" in capsys.readouterr().out


def test_lwlora_run_with_lr_written_as_2e_4(tiny_bert_dir, cls_dir, tmp_path):
    """``lr: 2e-4`` is a string to PyYAML; the run trains with the number."""
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {tiny_bert_dir}\ntask: classification\ndata: {cls_dir}\nout: {out}\nlayers: last\nnum_layers: 1\nmax_steps: 1\nbatch_size: 4\nmax_length: 24\ndevice: cpu\nlr: 2e-4\nbf16: 'no'\n")
    assert cli.main(["run", "--config", str(path), "--no-progress"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 2e-4 and saved["bf16"] is False


# ------------------------------------------------------------------------------- dependencies


def test_pyproject_declares_what_the_code_imports():
    """PEFT >= 0.14 (``exclude_modules``, always passed by peft_bridge) and tomli where tomllib is
    missing (Python 3.10; the gsm-symbolic task reads TOML)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dependency this test checks for
        import tomli as tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = {Requirement(text).name: Requirement(text) for text in project["dependencies"]}
    assert not requirements["peft"].specifier.contains(Version("0.13.2"))
    assert requirements["peft"].specifier.contains(Version("0.14.0"))
    tomli = requirements["tomli"]
    assert tomli.marker is not None
    assert tomli.marker.evaluate({"python_version": "3.10"}) and not tomli.marker.evaluate({"python_version": "3.11"})
    assert project["requires-python"] == ">=3.10"
    source = (Path(__file__).parents[1] / "src" / "lwlora" / "tasks" / "gsm_symbolic.py").read_text(encoding="utf-8")
    assert "import tomli as tomllib" in source  # the fallback the marker serves
