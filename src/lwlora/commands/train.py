"""``lwlora train`` and ``lwlora run``: build the TrainConfig (flags, or a YAML config with flag
overrides), train, and print the run's summary."""

from __future__ import annotations

from typing import Any

from lwlora.training.config import TrainConfig

#: ``lwlora run`` with no --config: the embedded demo (real weights and data from pip, CPU, minutes).
DEMO_CONFIG = "demo"


def print_result(result: Any) -> None:
    """The run's summary (main process only: one report per distributed launch)."""
    from lwlora.training.summary import format_summary
    from lwlora.training.trainer import is_main_process

    if not is_main_process():
        return
    print(format_summary(result.metrics))
    print(f"wrote {result.run_dir}")


def finish_distributed() -> None:
    """End a distributed launch's process group cleanly (torchrun / accelerate launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_train(values: dict[str, Any]) -> int:
    """``lwlora train``: the flags given (flat TrainConfig keys) → a run."""
    from lwlora.training.trainer import train

    print_result(train(TrainConfig(**values)))
    finish_distributed()
    return 0


def run_config(config: str | None, overrides: dict[str, Any]) -> int:
    """``lwlora run --config FILE [--key value ...]``: the YAML config (a file, or a shipped
    config's name; default the embedded demo) with any key overridden by its flag."""
    from lwlora.configs import load_config
    from lwlora.training.trainer import train

    data, source = load_config(config or DEMO_CONFIG)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.update(overrides)
    print_result(train(TrainConfig.from_dict(data, source=source)))
    finish_distributed()
    return 0
