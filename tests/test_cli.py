"""``lwlora select`` end to end on tiny saved checkpoints: the artifacts and the printout of a good
run, and for every bad input exit status 2, one stderr line naming the flag to fix, and nothing
written to ``--out``."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from lwlora.cli import main

FAST = ["--num-samples", "16", "--batch-size", "4", "--device", "cpu", "--no-progress"]
ERROR_LINE = re.compile(r"^lwlora select: error: (?P<rest>.+)$")
# tqdm bars from transformers/datasets ("Loading weights: 100%|...| 55/55 [00:00<00:00, ...it/s]").
_PROGRESS = re.compile(r"\d+%\|.*\|.*\[.*\]\s*$|^\S.*: \d+ \w+ \[\d\d:\d\d,")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``lwlora.cli.main(args)`` in-process: (exit status, stdout, stderr), argparse exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def select_args(model: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["select", str(model), "--data", str(data), "--out", str(out), *FAST, *extra]


def message_lines(stderr: str) -> list[str]:
    """stderr lines that are not progress-bar redraws."""
    lines = []
    for line in re.split(r"[\r\n]+", stderr):
        if line.strip() and not _PROGRESS.search(line):
            lines.append(line)
    return lines


def assert_usage_error(code: int, stderr: str, flag: str, *words: str, out: Path | None = None) -> str:
    """Exit 2, a single message line ``lwlora select: error: <...flag...>``, nothing in ``out``."""
    assert code == 2, f"exit status {code}, stderr: {stderr}"
    assert "Traceback" not in stderr
    lines = message_lines(stderr)
    assert len(lines) == 1, f"expected one message line, got {lines}"
    match = ERROR_LINE.match(lines[0])
    assert match, lines[0]
    rest = match["rest"]
    # Our errors start with the flag; argparse's say "argument --flag: ...".
    assert rest.startswith(flag + ":") or rest.startswith(f"argument {flag}:") or f"argument {flag}" in rest, rest
    for word in words:
        assert word in rest, f"{word!r} not in {rest!r}"
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} has {sorted(p.name for p in out.iterdir())}"
    return rest


def load_selection(out: Path) -> dict:
    return json.loads((out / "selection.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# good runs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_run(tiny_bert_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert-run") / "sel"
    code, stdout, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, out))
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-run") / "sel"
    code, stdout, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, out))
    return code, stdout, stderr, out


SELECTION_KEYS = {
    "schema_version", "model", "layers_path", "num_layers", "scorer", "pooling", "num_samples",
    "data_fingerprint", "layers", "selected", "one_hot", "versions", "timings",
}


def _check_artifacts(out: Path, *, num_layers: int, layers_path: str, model_kind: str, pooling: str) -> dict:
    selection = load_selection(out)
    assert SELECTION_KEYS <= set(selection)
    assert selection["schema_version"] == 1
    assert selection["num_layers"] == num_layers
    assert selection["layers_path"] == layers_path
    assert selection["model_kind"] == model_kind
    assert selection["scorer"] == "cka"
    assert selection["pooling"] == pooling
    assert selection["num_samples"] == 16
    assert selection["data_fingerprint"].startswith("sha256:")
    assert [r["index"] for r in selection["layers"]] == list(range(num_layers))
    for record in selection["layers"]:
        assert {"index", "cka", "importance", "degenerate"} <= set(record)
        if record["degenerate"]:
            assert record["importance"] is None and record["cka"] is None and record["reason"]
        else:
            assert 0.0 <= record["cka"] <= 1.0 + 1e-9
            assert record["importance"] == pytest.approx(1.0 - record["cka"])
    # default policy: ratio 0.5 -> floor(L / 2) blocks
    assert len(selection["selected"]) == num_layers // 2
    assert selection["one_hot"] == "".join("1" if i in selection["selected"] else "0" for i in range(num_layers))
    assert {"lwlora", "torch", "transformers"} <= set(selection["versions"])
    assert "total_s" in selection["timings"]

    rows = (out / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",")[:4] == ["index", "cka", "similarity", "importance"]
    assert len(rows) == 1 + num_layers
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return selection


def _check_stdout(stdout: str, out: Path, selection: dict) -> None:
    assert re.search(r"block\s+cka\s+importance\s+rank\s+selected", stdout)
    for record in selection["layers"]:
        assert re.search(rf"^\s+{record['index']}\s", stdout, re.M)
    assert f"selected {len(selection['selected'])}/{selection['num_layers']} blocks: {selection['selected']}" in stdout
    assert str(out / "selection.json") in stdout
    assert f"LayerSelection.load({str(out / 'selection.json')!r})" in stdout
    assert "apply_selection(model, selection" in stdout
    assert "build_peft_config(selection" in stdout


def test_encoder_happy_path(bert_run):
    code, stdout, stderr, out = bert_run
    assert code == 0, stderr
    selection = _check_artifacts(out, num_layers=3, layers_path="encoder.layer", model_kind="encoder", pooling="cls")
    _check_stdout(stdout, out, selection)
    # CLS at the embedding output is one vector for every sample: block 0 is degenerate, said once.
    assert selection["layers"][0]["degenerate"] is True
    assert 0 not in selection["selected"]
    assert stderr.count("warning: block 0 is degenerate") == 1


def test_decoder_happy_path(llama_run, tiny_llama_dir):
    code, stdout, stderr, out = llama_run
    assert code == 0, stderr
    selection = _check_artifacts(out, num_layers=4, layers_path="layers", model_kind="decoder", pooling="last")
    _check_stdout(stdout, out, selection)
    # The tokenizer on disk still has no pad token: lwlora padded in memory only.
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert config.get("pad_token") is None


@pytest.mark.parametrize(("run", "model_fixture", "num_layers"), [("bert_run", "tiny_bert_dir", 3), ("llama_run", "tiny_llama_dir", 4)])
def test_statistics_covariance_scores_like_the_rows(run, model_fixture, num_layers, request, data_files, tmp_path):
    """--statistics covariance keeps only d x d statistics per block, whatever n, and scores every
    block as the rows do (the default auto keeps the rows at n = 16); BERT's degenerate block 0 stays degenerate."""
    from lwlora.streaming import CKAStatistics

    rows_out = request.getfixturevalue(run)[3]
    out = tmp_path / "sel"
    code, _, stderr = run_cli(select_args(request.getfixturevalue(model_fixture), data_files.jsonl, out, "--statistics", "covariance"))
    assert code == 0, stderr
    rows, streamed = load_selection(rows_out), load_selection(out)
    assert rows["diagnostics"]["statistics"] == {"requested": "auto", "kept": "rows", "state_bytes": num_layers * 16 * (32 + 32) * 4}
    assert streamed["diagnostics"]["statistics"] == {"requested": "covariance", "kept": "covariance", "state_bytes": num_layers * CKAStatistics.state_nbytes(32, 32)}
    for got, expected in zip(streamed["layers"], rows["layers"]):
        assert (got["degenerate"], got["reason"], got["fallback"]) == (expected["degenerate"], expected["reason"], expected["fallback"])
        assert got["cka"] == (None if expected["cka"] is None else pytest.approx(expected["cka"], rel=1e-9))
    assert streamed["selected"] == rows["selected"]
    if run == "bert_run":
        assert streamed["layers"][0]["degenerate"]


def test_same_inputs_same_scores(bert_run, tiny_bert_dir, data_files, tmp_path):
    first = load_selection(bert_run[3])
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "again"))
    assert code == 0, stderr
    again = load_selection(tmp_path / "again")
    assert again["data_fingerprint"] == first["data_fingerprint"]
    assert again["selected"] == first["selected"]
    for a, b in zip(again["layers"], first["layers"]):
        if b["importance"] is None:
            assert a["importance"] is None
        else:
            assert a["importance"] == pytest.approx(b["importance"], abs=1e-6)


def test_num_layers(tiny_llama_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, tmp_path / "o", "--num-layers", "2"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert len(selection["selected"]) == 2
    assert selection["policy"]["num_layers"] == 2
    scored = sorted((r for r in selection["layers"] if r["importance"] is not None), key=lambda r: -r["importance"])
    assert selection["selected"] == sorted(r["index"] for r in scored[:2])


def test_explicit_layers(tiny_bert_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "o", "--layers", "0,2"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["selected"] == [0, 2]
    assert selection["one_hot"] == "101"
    assert selection["layers"][1]["importance"] is not None  # scores are still reported


def test_exclude(tiny_llama_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, tmp_path / "o", "--num-layers", "3", "--exclude", "1"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["selected"] == [0, 2, 3]
    assert selection["policy"]["exclude"] == [1]


def test_include(tiny_llama_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, tmp_path / "o", "--num-layers", "1", "--include", "0"))
    assert code == 0, stderr
    assert load_selection(tmp_path / "o")["selected"] == [0]  # block 0 is degenerate, but included


@pytest.mark.parametrize("scorer", ["bi", "angular"])
def test_cosine_scorers(tiny_llama_dir, data_files, tmp_path, scorer):
    code, stdout, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, tmp_path / "o", "--scorer", scorer))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["scorer"] == scorer
    assert selection["similarity_name"] == "cosine"
    for record in selection["layers"]:
        assert record["cka"] is None
        assert record["importance"] is not None and record["importance"] >= 0.0
        assert record["similarity"] is not None
    header = (tmp_path / "o" / "scores.csv").read_text().splitlines()[0]
    assert header.startswith("index,cka,similarity,importance")
    assert re.search(r"block\s+cosine\s+importance", stdout)


def test_debiased_cka(tiny_bert_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "o", "--scorer", "cka-debiased"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["scorer"] == "cka-debiased" and selection["similarity_name"] == "cka"
    scored = [r for r in selection["layers"] if not r["degenerate"]]
    assert scored and all(r["cka"] is not None and r["importance"] == pytest.approx(1 - r["cka"]) for r in scored)


def test_mean_pooling(tiny_bert_dir, data_files, tmp_path):
    code, stdout, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "o", "--pooling", "mean"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["pooling"] == "mean"
    assert not any(r["degenerate"] for r in selection["layers"])  # mean over tokens varies at block 0


def test_paper_preset_never_selects_block_0_on_an_encoder(tiny_bert_dir, data_files, tmp_path):
    # With mean pooling block 0 has a real score, so only the preset keeps it out.
    code, stdout, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "o", "--pooling", "mean", "--preset", "paper", "--num-layers", "2"))
    assert code == 0, stderr
    selection = load_selection(tmp_path / "o")
    assert selection["layers"][0]["importance"] is not None
    assert selection["selected"] == [1, 2]
    assert selection["policy"]["preset"] == "paper"
    assert selection["policy"]["exclude"] == [0]


def test_sentence_pairs_and_directory_split(tiny_bert_dir, data_files, tmp_path):
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data_files.pairs, tmp_path / "pairs"))
    assert code == 0, stderr
    code, _, stderr = run_cli(select_args(tiny_bert_dir, f"{data_files.splits}:validation", tmp_path / "split"))
    assert code == 0, stderr
    assert load_selection(tmp_path / "split")["num_samples"] == 12


def test_out_may_already_exist(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli(select_args(tiny_llama_dir, data_files.jsonl, out, "--num-layers", "1"))
    assert code == 0, stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "selection.json").is_file()


def test_subprocess_happy_path_and_usage_error(tiny_bert_dir, data_files, tmp_path):
    """The real entry point: exit statuses as a shell sees them."""
    good = subprocess.run(
        [sys.executable, "-m", "lwlora.cli", *select_args(tiny_bert_dir, data_files.jsonl, tmp_path / "good", "--num-layers", "1")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "good" / "selection.json").read_text())["num_layers"] == 3
    assert "selected 1/3 blocks" in good.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "lwlora.cli", *select_args("./does-not-exist", data_files.jsonl, tmp_path / "bad")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert_usage_error(bad.returncode, bad.stderr, "MODEL", "./does-not-exist", out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_version_and_help():
    code, stdout, _ = run_cli(["--version"])
    assert code == 0 and stdout.startswith("lwlora ")
    code, stdout, _ = run_cli(["select", "--help"])
    assert code == 0 and "--num-samples" in stdout


# ------------------------------------------------------------------------------------------------
# bad inputs: exit 2, one line naming the flag, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    (root / "empty.jsonl").write_text("")
    (root / "garbage.jsonl").write_text('{"text": "ok"}\nnot json at all {{{\n\x00\x01\n')
    (root / "data.xml").write_text("<text>hello</text>")
    write_jsonl(root / "hole.jsonl", [{"text": "the cat sat."}, {"text": ""}])
    return root


# (id, extra args or callable(dirs) -> (model, data, extra), flag, words in the message)
def _cases():
    def bert(data="jsonl", *extra):
        return lambda d: (d["bert"], d[data], list(extra))

    return [
        ("missing-column", bert("jsonl", "--text-column", "nope"), "--text-column", ["'nope'", "'text'", "'label'"]),
        ("missing-pair-column", bert("jsonl", "--text-pair-column", "nope"), "--text-pair-column", ["'nope'"]),
        ("template-field", bert("jsonl", "--template", "{text} {nope}"), "--template", ["'nope'"]),
        ("empty-data", bert("empty"), "--data", ["empty.jsonl"]),
        ("empty-text", bert("hole"), "--text-column", ["record 1"]),
        ("garbage-jsonl", bert("garbage"), "--data", ["garbage.jsonl"]),
        ("unsupported-extension", bert("xml"), "--data", [".xml"]),
        ("missing-data-file", bert("missing"), "--data", ["not found"]),
        ("missing-split", bert("split-test"), "--data", ["'test'", "train, validation"]),
        ("ratio-0", bert("jsonl", "--ratio", "0"), "--ratio", ["(0, 1]"]),
        ("ratio-1.5", bert("jsonl", "--ratio", "1.5"), "--ratio", ["1.5"]),
        ("ratio-rounds-to-0", bert("jsonl", "--ratio", "0.1"), "--ratio", ["0 blocks"]),
        ("num-layers-too-many", bert("jsonl", "--num-layers", "99"), "--num-layers", ["99", "3 blocks"]),
        ("num-layers-0", bert("jsonl", "--num-layers", "0"), "--num-layers", []),
        ("debiased-needs-4-samples", bert("jsonl", "--num-samples", "3", "--scorer", "cka-debiased"), "--num-samples", ["4"]),
        ("data-too-small-for-debiased", bert("three", "--scorer", "cka-debiased"), "--num-samples", ["4", "3"]),
        ("unknown-scorer", bert("jsonl", "--scorer", "magic"), "--scorer", ["magic"]),
        ("unknown-pooling", bert("jsonl", "--pooling", "max"), "--pooling", []),
        ("unknown-preset", bert("jsonl", "--preset", "fancy"), "--preset", []),
        ("layers-out-of-range", bert("jsonl", "--layers", "0,7"), "--layers", ["[7]", "0..2"]),
        ("layers-not-integers", bert("jsonl", "--layers", "a,b"), "--layers", []),
        ("include-out-of-range", bert("jsonl", "--include", "5"), "--include", ["[5]"]),
        ("exclude-out-of-range", bert("jsonl", "--exclude", "-1"), "--exclude", ["[-1]"]),
        ("include-exclude-overlap", bert("jsonl", "--include", "1", "--exclude", "1,2"), "--exclude", ["[1]", "--include"]),
        ("include-more-than-count", bert("jsonl", "--num-layers", "1", "--include", "1,2"), "--include", []),
        ("exclude-leaves-too-few", bert("jsonl", "--num-layers", "3", "--exclude", "0"), "--exclude", []),
        ("ratio-and-num-layers", bert("jsonl", "--ratio", "0.5", "--num-layers", "1"), "--ratio", ["--num-layers"]),
        ("preset-with-layers", bert("jsonl", "--preset", "paper", "--layers", "1"), "--preset", []),
        ("batch-size-0", bert("jsonl", "--batch-size", "0"), "--batch-size", []),
        ("max-length-0", bert("jsonl", "--max-length", "0"), "--max-length", []),
        ("num-samples-0", bert("jsonl", "--num-samples", "0"), "--num-samples", []),
        ("bad-device", bert("jsonl", "--device", "quantum"), "--device", ["quantum"]),
        ("bad-dtype", bert("jsonl", "--dtype", "float8"), "--dtype", ["float8"]),
        ("layers-path-missing", bert("jsonl", "--layers-path", "encoder.blocks"), "--layers-path", ["encoder.blocks", "candidates", "encoder.layer", "BertLayer"]),
        ("layers-path-not-a-list", bert("jsonl", "--layers-path", "embeddings"), "--layers-path", ["BertEmbeddings", "encoder.layer"]),
        ("no-blocks", lambda d: (d["zero"], d["jsonl"], []), "--layers-path", ["none found"]),
        ("unknown-model-type", lambda d: (d["alien"], d["jsonl"], []), "MODEL", ["alien"]),
        ("model-dir-missing", lambda d: ("./does-not-exist", d["jsonl"], []), "MODEL", ["./does-not-exist"]),
        ("model-hub-id-offline", lambda d: ("no-such-org-xyz/no-such-model", d["jsonl"], []), "MODEL", ["no-such-org-xyz/no-such-model"]),
        ("model-dir-empty", lambda d: (d["empty-dir"], d["jsonl"], []), "MODEL", []),
        ("model-config-corrupt", lambda d: (d["bad-config"], d["jsonl"], []), "MODEL", []),
        ("hub-dataset-offline", bert("no_such_dataset_xyz"), "--data", ["no_such_dataset_xyz"]),
        ("unknown-builtin-data", bert("builtin:nope"), "--data", ["builtin:humaneval"]),
        ("unknown-builtin-model", lambda d: ("builtin:nope", d["jsonl"], []), "MODEL", ["builtin:minilm"]),
        ("gguf-file-missing", bert("jsonl", "--gguf-file", "model.gguf"), "--gguf-file", ["model.gguf"]),
        ("statistics-covariance-needs-cka", bert("jsonl", "--statistics", "covariance", "--scorer", "bi"), "--statistics", ["bi", "--statistics auto or rows"]),
        ("statistics-covariance-with-bootstrap", bert("jsonl", "--statistics", "covariance", "--bootstrap", "5"), "--statistics", ["--bootstrap"]),
        ("unknown-statistics", bert("jsonl", "--statistics", "sketch"), "--statistics", ["sketch"]),
    ]


CASES = _cases()


@pytest.fixture(scope="module")
def bad_models(tiny_bert_dir, tmp_path_factory):
    """A checkpoint with no blocks at all, and one whose model_type transformers does not know."""
    import torch
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad-models")
    zero = root / "zero-blocks"
    torch.manual_seed(0)
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    BertModel(BertConfig(**{**config, "num_hidden_layers": 0})).save_pretrained(zero)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert_dir / name, zero / name)

    (root / "empty-dir").mkdir()
    bad_config = root / "bad-config"
    shutil.copytree(tiny_bert_dir, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "bert", "hidden_size": ')

    alien = root / "alien"
    shutil.copytree(tiny_bert_dir, alien)
    (alien / "config.json").write_text(json.dumps({**config, "model_type": "alien-transformer", "architectures": ["AlienModel"]}))
    return {"zero": zero, "alien": alien, "empty-dir": root / "empty-dir", "bad-config": bad_config}


@pytest.mark.parametrize(("name", "make", "flag", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, make, flag, words, tiny_bert_dir, data_files, bad_files, bad_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # for ./does-not-exist
    three = write_jsonl(tmp_path / "three.jsonl", [{"text": t} for t in ("a cat.", "a dog sat.", "the big bird ran.")])
    dirs = {
        "bert": tiny_bert_dir,
        "jsonl": data_files.jsonl,
        "empty": bad_files / "empty.jsonl",
        "garbage": bad_files / "garbage.jsonl",
        "xml": bad_files / "data.xml",
        "hole": bad_files / "hole.jsonl",
        "missing": tmp_path / "nope" / "data.jsonl",
        "split-test": f"{data_files.splits}:test",
        "three": three,
        "no_such_dataset_xyz": "no_such_dataset_xyz",
        "builtin:nope": "builtin:nope",
        **bad_models,
    }
    model, data, extra = make(dirs)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["select", str(model), "--data", str(data), "--out", str(out), *FAST, *extra])
    assert_usage_error(code, stderr, flag, *words, out=out)
    assert not out.exists()
    assert "apply it" not in stdout


def test_out_is_a_file(tiny_bert_dir, data_files, tmp_path):
    out = tmp_path / "taken"
    out.write_text("do not touch")
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, out))
    assert_usage_error(code, stderr, "--out")
    assert out.read_text() == "do not touch"


@pytest.mark.parametrize("count", [["--ratio", "1.0"], ["--num-layers", "3"]], ids=["ratio", "num-layers"])
def test_paper_preset_asking_for_every_block_names_a_flag_the_user_gave(tiny_bert_dir, data_files, tmp_path, count):
    out = tmp_path / "out"
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data_files.jsonl, out, "--preset", "paper", *count))
    assert code == 2
    rest = ERROR_LINE.match(message_lines(stderr)[0])["rest"]
    assert rest.split(":")[0] in (count[0], "--preset"), rest
    assert not out.exists()


def test_corrupt_weights(tiny_bert_dir, data_files, tmp_path):
    model = tmp_path / "corrupt"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").write_bytes(b"this is not a safetensors file")
    out = tmp_path / "out"
    code, _, stderr = run_cli(select_args(model, data_files.jsonl, out))
    assert_usage_error(code, stderr, "MODEL", out=out)


def test_model_dir_without_tokenizer(tiny_bert_dir, data_files, tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, model / name)
    out = tmp_path / "out"
    code, _, stderr = run_cli(select_args(model, data_files.jsonl, out))
    assert_usage_error(code, stderr, "MODEL", out=out)


def test_usage_error_is_the_only_stderr_line(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "fresh.jsonl", [{"text": f"the cat sat {i} times."} for i in range(8)])  # not yet cached by datasets
    out = tmp_path / "out"
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data, out, "--text-column", "nope"))
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert ERROR_LINE.match(stderr.strip())


def test_no_progress_hides_every_progress_bar(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "fresh.jsonl", [{"text": f"a dog ran {i} times."} for i in range(8)])
    code, _, stderr = run_cli(select_args(tiny_bert_dir, data, tmp_path / "out"))
    assert code == 0
    assert all(line.startswith("warning: ") for line in stderr.splitlines()), stderr
