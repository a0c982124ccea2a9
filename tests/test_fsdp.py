"""`lwlora train` under FSDP2 (torch's fully_shard, through the Trainer's accelerate) with two gloo
processes on the CPU, adapters on some blocks only: the same loss curve as one process at the same
global batch, and a normal PEFT adapter of the selected blocks.

accelerate (1.15) turns FSDP on only for GPU-like distributed types, never on the CPU (it would
silently run DDP), so the processes start through a shim that lets its FSDP plugin stand on gloo;
the FSDP environment is the one `accelerate launch` sets from the shipped example config
(examples/accelerate/fsdp2-llama.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_jsonl

_CPU_FSDP = textwrap.dedent(
    """
    import sys
    import accelerate.state as st

    _init = st.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == st.DistributedType.MULTI_CPU:
            if fsdp_plugin is not None:
                self.fsdp_plugin = fsdp_plugin
            if getattr(self, "fsdp_plugin", None) is not None:  # a later AcceleratorState() recopies MULTI_CPU
                self.distributed_type = st.DistributedType.FSDP

    st.AcceleratorState.__init__ = __init__

    import os
    if os.environ.get("KILL_AFTER_CHECKPOINT"):  # rank 0 dies right after that step's checkpoint is complete
        from transformers import TrainerCallback
        import lwlora.training.trainer as trainer_module

        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == int(os.environ["KILL_AFTER_CHECKPOINT"]) and os.environ.get("RANK", "0") == "0":
                    os._exit(9)

        train = trainer_module.train
        trainer_module.train = lambda config, callbacks=None: train(config, callbacks=[Kill(), *(callbacks or [])])

    from lwlora import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2-llama.yaml"


def accelerate_environment(config: Path) -> dict[str, str]:
    """The FSDP environment `accelerate launch --config_file CONFIG` gives each process (the
    shipped example config: what the test runs is what users launch), in fp32 for the CPU."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "train.py"]))
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return env


def test_fsdp2_with_adapters_on_some_blocks_matches_one_process_and_resumes(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = tmp_path / "inst"
    data.mkdir()
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran #### {i}", "answer": str(i)} for i in range(32)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:4])
    shim = tmp_path / "cpu_fsdp.py"
    shim.write_text(_CPU_FSDP)

    def launch(name, processes, *extra, kill_after=None):
        out = tmp_path / name
        args = ["train", str(tiny_llama_dir), "--task", "instruction", "--data", str(data), "--out", str(out), "--layers", "1,3", "--max-steps", "4",
                "--logging-steps", "1", "--max-length", "48", "--max-new-tokens", "2", "--device", "cpu", "--no-progress", "--dropout", "0", "--lr", "5e-3",
                "--eval-batch-size", "4", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(shim), *args]
            env.update(accelerate_environment(EXAMPLE_CONFIG))
            if kill_after is not None:
                env["KILL_AFTER_CHECKPOINT"] = str(kill_after)
        else:
            command = [sys.executable, "-m", "lwlora.cli", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        if kill_after is not None:
            assert done.returncode != 0 and not (out / "metrics.json").exists()
            return out, None
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("adapted blocks [1, 3]") == 1  # one report, from the main process
        return out, json.loads((out / "metrics.json").read_text())

    one, single = launch("one", 1, "--batch-size", "8")
    two, sharded = launch("two", 2, "--batch-size", "4")
    # sharded for real: the Trainer saved its checkpoint the FSDP way (accelerate's save_fsdp_model)
    assert (two / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()
    assert [h["loss"] for h in sharded["loss_history"]] == pytest.approx([h["loss"] for h in single["loss_history"]], rel=1e-4)
    assert len(sharded["loss_history"]) == 4 and sharded["train"]["tokens"] == single["train"]["tokens"]
    assert sharded["final"]["validation"]["loss"] == pytest.approx(single["final"]["validation"]["loss"], rel=1e-4)
    assert "exact_match" in sharded["final"]["validation"]  # generation with the sharded model ran on every process
    assert sharded["params"] == single["params"]

    saved = load_file(two / "adapter" / "adapter_model.safetensors")
    reference = load_file(one / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(reference) and {int(k.split(".layers.")[1].split(".")[0]) for k in saved} == {1, 3}
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    assert max(float((saved[k] - reference[k]).abs().max()) for k in saved) < 1e-5
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), two / "adapter")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(saved) and all((loaded[k] == saved[k]).all() for k in saved)

    # killed right after the checkpoint of step 2, then --resume: the same run as without the kill
    launch("killed", 2, "--batch-size", "4", "--save-every", "2", kill_after=2)
    killed, resumed = launch("killed", 2, "--batch-size", "4", "--save-every", "2", "--resume")
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2") and resumed["train"]["global_step"] == 4
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx([h["loss"] for h in sharded["loss_history"]], rel=1e-4)


@pytest.mark.parametrize("flag, version", [("--merge", "1"), ("--merge", "2"), ("--eval-untuned", "2"), ("--prune-at 0.1", "2"), ("--dynamic-blocks 0.5", "1")])
def test_what_fsdp_cannot_do_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, flag, version):
    """--merge needs every shard on one process; FSDP2 prepares a model only with its optimizer,
    so the evaluation before training (--eval-untuned) cannot run; --prune-at and --dynamic-blocks
    remove or freeze adapters block by block, which sharding does not allow. Each is a one-line
    error (accelerate launch sets FSDP by environment, not through TrainingArguments.fsdp)."""
    from lwlora import cli

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    out = tmp_path / "run"
    extra = ["--layers", "all"] if flag.startswith(("--prune-at", "--dynamic-blocks")) else []
    code = cli.main(["train", "m", "--task", "instruction", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", *flag.split(), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and flag.split()[0] in err[0] and "FSDP" in err[0], err
    assert not out.exists()
