"""Run directories never lose a finished run, and interrupted training resumes correctly.

The interruption tests kill a real `lwlora train` process (SIGKILL, from inside it, at the moment
named), then `--resume` it through the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import write_jsonl

from lwlora import cli
from lwlora.errors import ConfigError
from lwlora.training.run_dir import hold_run, lock_path


@pytest.fixture(scope="module")
def quiet_bert(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT without dropout: runs with the same seed give the same losses."""
    model = tmp_path_factory.mktemp("quiet-bert") / "bert"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-run-dir")
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(32)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:8])
    return root


def _args(model, data, out, *extra) -> list[str]:
    """The arguments of a short run; an ``extra`` ``--layers`` or ``--preset`` replaces the default layer choice."""
    layers = [] if "--layers" in extra or "--preset" in extra else ["--layers", "last", "--num-layers", "1"]
    return ["train", str(model), "--task", "classification", "--data", str(data), "--out", str(out), *layers,
            "--max-steps", "6", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-progress", "--dropout", "0", "--logging-steps", "1", *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def finished_run(quiet_bert, cls_data, tmp_path):
    run = tmp_path / "run"
    assert cli.main(_args(quiet_bert, cls_data, run, "--max-steps", "2")) == 0
    return run


# ------------------------------------------------------------------------- --overwrite is safe


@pytest.mark.parametrize(
    "extra, flag",
    [
        (("--layers", "7"), "--layers"),  # found only once the model is loaded
        (("--data", "__missing__"), "--data"),
        (("--pooling", "bogus"), "--pooling"),
    ],
)
def test_a_failed_overwrite_leaves_the_finished_run_intact(quiet_bert, cls_data, finished_run, tmp_path, capsys, extra, flag):
    before = _snapshot(finished_run)
    extra = tuple(str(tmp_path / "nope.jsonl") if e == "__missing__" else e for e in extra)
    capsys.readouterr()
    assert cli.main(_args(quiet_bert, cls_data, finished_run, "--max-steps", "2", "--overwrite", *extra)) == 2
    assert flag in (line := _error_line(capsys)) and "give only one" not in line
    assert _snapshot(finished_run) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [".run.overwrite"])


def test_an_overwrite_replaces_the_run_once_it_finished(quiet_bert, cls_data, finished_run, tmp_path):
    old = json.loads((finished_run / "metrics.json").read_text())
    assert cli.main([*_args(quiet_bert, cls_data, finished_run, "--max-steps", "3"), "--overwrite"]) == 0
    new = json.loads((finished_run / "metrics.json").read_text())
    assert old["train"]["global_step"] == 2 and new["train"]["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or replaced run left beside it
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()


def test_an_overwrite_killed_midway_leaves_the_old_run(quiet_bert, cls_data, finished_run, tmp_path):
    before = _snapshot(finished_run)
    done = _killed_run([*_args(quiet_bert, cls_data, finished_run, "--save-every", "2"), "--overwrite"], kill="after-save", step=2)
    assert done.returncode == -9
    assert _snapshot(finished_run) == before


# ------------------------------------------------------------------------- one writer per run


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(quiet_bert, cls_data, finished_run, capsys):
    before = _snapshot(finished_run)
    with hold_run(finished_run):  # what a first `lwlora train --out RUN` holds while it runs
        capsys.readouterr()
        assert cli.main([*_args(quiet_bert, cls_data, finished_run, "--max-steps", "3"), "--resume"]) == 2
        line = _error_line(capsys)
        assert "--out" in line and f"being written by another lwlora run (pid {os.getpid()}" in line
        assert cli.main([*_args(quiet_bert, cls_data, finished_run, "--max-steps", "3"), "--overwrite"]) == 2
    assert _snapshot(finished_run) == before
    assert not lock_path(finished_run).exists()


def test_a_lock_file_left_by_a_killed_run_does_not_block_the_next(quiet_bert, cls_data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from lwlora.training.run_dir import hold_run\nwith hold_run({str(run)!r}):\n    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another lwlora run"):
            with hold_run(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays
        holder.wait()
    assert lock_path(run).exists()
    assert cli.main(_args(quiet_bert, cls_data, run, "--max-steps", "2")) == 0
    assert _metrics(run)["train"]["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_run_lock_admits_one_holder_at_a_time(tmp_path):
    """Threads racing for the lock (each open is its own flock): never two inside at once, and
    every release lets a later attempt in (the lock file is removed and made anew each time)."""
    run = tmp_path / "run"
    inside, most, entered = [0], [0], [0]
    guard = threading.Lock()
    start = threading.Barrier(6)

    def contend():
        start.wait()
        for _ in range(200):
            try:
                with hold_run(run):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                        entered[0] += 1
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
            except ConfigError:
                pass

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and entered[0] > 0
    assert not lock_path(run).exists()
    with hold_run(run):
        pass


def test_a_refused_run_leaves_no_folders_behind(quiet_bert, cls_data, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert cli.main(_args(quiet_bert, cls_data, out, "--layers", "7")) == 2  # the model has 3 blocks: found once it is loaded
    assert "--layers" in (line := _error_line(capsys)) and "give only one" not in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- select into a run


def test_select_refuses_a_training_run_as_out(tiny_bert_dir, data_files, finished_run, capsys):
    before = (finished_run / "selection.json").read_bytes()
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(finished_run), "--num-samples", "8", "--device", "cpu", "--no-progress"]) == 2
    assert "is a training run" in _error_line(capsys)
    assert (finished_run / "selection.json").read_bytes() == before


# ------------------------------------------------------------------------- unwritable --out


def _blocker(tmp_path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker


@pytest.mark.parametrize("command", ["select", "train", "eval", "compare"])
def test_an_out_under_a_file_fails_before_any_compute(tiny_bert_dir, quiet_bert, cls_data, data_files, finished_run, tmp_path, capsys, monkeypatch, command):
    out = _blocker(tmp_path) / "sub"
    import lwlora.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    argv = {
        "select": ["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--device", "cpu", "--no-progress"],
        "train": _args(quiet_bert, cls_data, out),
        "eval": ["eval", str(finished_run), "--out", str(out / "eval.json"), "--no-progress"],
        "compare": ["compare", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--methods", "cka,random", "--no-progress"],
    }[command]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "--out" in line and "a-file is a file" in line


def test_eval_out_pointing_at_a_directory_is_refused(finished_run, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    assert cli.main(["eval", str(finished_run), "--out", str(tmp_path / "results"), "--no-progress"]) == 2
    assert "is a directory" in _error_line(capsys)


def test_a_read_only_out_fails_before_any_compute(tiny_bert_dir, data_files, tmp_path, capsys, monkeypatch):
    """Root may write into a 0555 directory, so the check creates a file for real; a read-only
    filesystem refuses that creation (simulated here, as these tests run as root)."""
    import lwlora.io as io

    monkeypatch.setattr(io, "_probe", lambda directory: "Read-only file system")
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(tmp_path / "sel"), "--device", "cpu", "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "cannot be written" in line and "Read-only file system" in line
    assert not (tmp_path / "sel").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused(tiny_bert_dir, data_files, tmp_path, capsys):  # pragma: no cover - non-root machines
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(locked / "sel"), "--device", "cpu", "--no-progress"]) == 2


# ------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_artifacts_get_the_umask_permissions(quiet_bert, cls_data, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        run = tmp_path / "run"
        assert cli.main(_args(quiet_bert, cls_data, run, "--max-steps", "1")) == 0
    finally:
        os.umask(previous)
    for name in ("train_config.json", "selection.json", "metrics.json", "loss_curve.png", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == mode, name


# ------------------------------------------------------------------------- interrupted training

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import transformers
    from transformers import TrainerCallback
    from lwlora import cli

    kill, step = os.environ["KILL"], int(os.environ["KILL_STEP"])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill == "while-saving":  # after the weights and optimizer, before trainer_state.json
        original = transformers.Trainer._save_rng_state
        def save_rng_state(self, output_dir):
            if output_dir.rstrip("/").endswith(f"checkpoint-{step}"):
                die()
            return original(self, output_dir)
        transformers.Trainer._save_rng_state = save_rng_state

    class Killer(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # the checkpoint is complete
            if kill == "after-save" and state.global_step == step:
                die()
        def on_train_end(self, args, state, control, **kwargs):  # after the last checkpoint
            if kill == "after-training":
                die()

    import lwlora.training.trainer as trainer_module
    train = trainer_module.train
    trainer_module.train = lambda config, callbacks=None: train(config, callbacks=[Killer(), *(callbacks or [])])
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _killed_run(argv: list[str], *, kill: str, step: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL": kill, "KILL_STEP": str(step), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _KILLER, *argv], capture_output=True, text=True, timeout=300, env=env)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_a_kill_while_saving_resumes_from_the_last_complete_checkpoint(quiet_bert, cls_data, tmp_path, capsys):
    run = tmp_path / "run"
    done = _killed_run(_args(quiet_bert, cls_data, run, "--save-every", "2"), kill="while-saving", step=4)
    assert done.returncode == -9, done.stderr[-2000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"] and not (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    assert cli.main([*_args(quiet_bert, cls_data, run, "--save-every", "2"), "--resume"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "incomplete" in line]
    assert warning and "checkpoint-4" in warning[0] and "resuming from checkpoint-2" in warning[0]
    metrics = _metrics(run)
    assert metrics["train"]["global_step"] == 6 and metrics["train"]["resumed_from"].endswith("checkpoint-2")


def test_a_kill_after_the_last_checkpoint_does_not_train_past_max_steps(quiet_bert, cls_data, tmp_path, capsys):
    run = tmp_path / "run"
    done = _killed_run(_args(quiet_bert, cls_data, run, "--save-every", "3"), kill="after-training")
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "checkpoint-6").is_dir()
    assert cli.main([*_args(quiet_bert, cls_data, run, "--save-every", "3"), "--resume"]) == 0
    assert "nothing left to train" in capsys.readouterr().err
    metrics = _metrics(run)
    assert metrics["train"]["global_step"] == 6
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_train_loss_after_a_resume_covers_the_whole_run(quiet_bert, cls_data, tmp_path):
    whole = tmp_path / "whole"
    assert cli.main(_args(quiet_bert, cls_data, whole, "--save-every", "3")) == 0
    run = tmp_path / "run"
    done = _killed_run(_args(quiet_bert, cls_data, run, "--save-every", "3"), kill="after-save", step=3)
    assert done.returncode == -9, done.stderr[-2000:]
    assert cli.main([*_args(quiet_bert, cls_data, run, "--save-every", "3"), "--resume"]) == 0
    resumed, uninterrupted = _metrics(run)["train"], _metrics(whole)["train"]
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-4)
    assert resumed["train_loss_this_session"] != pytest.approx(uninterrupted["train_loss"], rel=1e-4)  # the last 3 steps only
    logged = [h["loss"] for h in _metrics(whole)["loss_history"]]
    assert uninterrupted["train_loss"] == pytest.approx(sum(logged) / len(logged), rel=1e-4)


@pytest.mark.parametrize("first, second, changed", [
    (["--layers", "all", "--budget-from-ratio", "0.5"], ["--layers", "all"], "budget_from_ratio: 0.5 -> None"),
    (["--preset", "recommended"], ["--layers", "all", "--budget-from-ratio", "0.34"], "budget_from_ratio: 0.5 -> 0.34"),
    (["--layers", "all"], ["--layers", "all", "--rank-allocation", "importance", "--pooling", "mean"], "rank_allocation: 'uniform' -> 'importance'"),
    (["--layers", "all"], ["--layers", "all", "--prune-at", "2"], "prune_at: None -> 2"),
])
def test_resume_refuses_a_run_that_would_train_other_adapters(quiet_bert, cls_data, tmp_path, capsys, first, second, changed):
    """The adapters' shapes and schedule are part of what a run is: resuming with another budget,
    rank allocation or pruning is refused up front (exit 2, nothing touched), not left to a
    checkpoint that no longer fits."""
    run = tmp_path / "run"
    assert cli.main([*_args(quiet_bert, cls_data, run, "--max-steps", "2", *first)]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert cli.main([*_args(quiet_bert, cls_data, run, "--max-steps", "4", *second), "--resume"]) == 2
    line = _error_line(capsys)
    assert line.startswith("lwlora train: error: --resume:") and "holds a different run" in line and changed in line, line
    assert _snapshot(run) == before


def test_resume_compares_the_later_identity_fields_only_where_the_run_recorded_them(tmp_path):
    """A run directory written before lwlora recorded a field (its train_config.json lacks it)
    still resumes; one that recorded another value does not."""
    from lwlora.training.config import IDENTITY_FIELDS, LATER_IDENTITY_FIELDS, TrainConfig
    from lwlora.training.run_dir import prepare_run_dir

    assert set(LATER_IDENTITY_FIELDS) < set(IDENTITY_FIELDS) and "budget_from_ratio" in LATER_IDENTITY_FIELDS
    identity = TrainConfig(model="m", task="classification", out=str(tmp_path / "run"), layers="all").identity()
    run = tmp_path / "run"
    run.mkdir()
    older = {k: v for k, v in identity.items() if k not in LATER_IDENTITY_FIELDS}
    (run / "train_config.json").write_text(json.dumps(older))
    assert prepare_run_dir(str(run), identity, resume=True, overwrite=False, optional=LATER_IDENTITY_FIELDS).work == run
    (run / "train_config.json").write_text(json.dumps({**older, "budget_from_ratio": 0.5}))
    with pytest.raises(ConfigError, match=r"budget_from_ratio: 0.5 -> None"):
        prepare_run_dir(str(run), identity, resume=True, overwrite=False, optional=LATER_IDENTITY_FIELDS)
    with pytest.raises(ConfigError, match=r"--resume: .* holds a different run \(model: None -> 'm'\)"):  # the original fields stay required
        (run / "train_config.json").write_text(json.dumps({k: v for k, v in identity.items() if k != "model"}))
        prepare_run_dir(str(run), identity, resume=True, overwrite=False, optional=LATER_IDENTITY_FIELDS)
