"""What a person sees: the end-of-run summary, loss_curve.png, importance.png, stability.png, and a console without stray bars or deprecation noise."""

from __future__ import annotations

import pytest
from matplotlib.colors import to_rgba

from lwlora.selection import colors
from lwlora.selection.artifact import LayerRecord, LayerSelection
from lwlora.selection.report import importance_figure, plot_importance
from lwlora.selection.stability import LayerStability, StabilityReport, plot_stability, stability_figure
from lwlora.training.report import loss_curve_figure, plot_loss_curve
from lwlora.training.summary import format_summary

PNG = b"\x89PNG\r\n\x1a\n"


def classification_metrics() -> dict:
    return {
        "task": "classification", "method": "lora", "selected": [2], "num_layers": 3, "max_length": 24,
        "params": {"total": 35394, "trainable": 3650, "adapter": 3584, "head": 66},
        "cost": {"adapter_params": 3584, "all_layer_adapter_params": 10752, "adapter_fraction": 1 / 3, "head_params": 66},
        "train": {"runtime_s": 0.412, "global_step": 3, "epochs": 1.0, "train_loss": 0.69267, "tokens": 338, "tokens_per_s": 820.4,
                  "resumed_from": None, "peak_memory_bytes": 3 * 2**29, "peak_memory_kind": "host_max_rss"},
        "final": {"validation": {"loss": 0.693205, "accuracy": 0.5, "runtime": 0.009, "samples_per_second": 669.2, "steps_per_second": 111.5,
                                 "epoch": 1.0, "num_input_tokens_seen": 338}},
    }


def causal_metrics(untuned: bool) -> dict:
    metrics = {
        "task": "gsm-symbolic", "method": "lora", "selected": [0, 5, 13, 29], "num_layers": 30, "max_length": 512,
        "params": {"total": 134515008, "trainable": 1638400, "adapter": 1638400, "head": 0},
        "cost": {"adapter_params": 1638400, "all_layer_adapter_params": 12288000, "adapter_fraction": 1638400 / 12288000},
        "train": {"runtime_s": 3725.0, "global_step": 1250, "epochs": 0.5, "train_loss": 0.41234, "tokens_per_s": None,
                  "resumed_from": "RUN/checkpoints/checkpoint-1000", "peak_memory_bytes": 18 * 2**30, "peak_memory_kind": "cuda_allocated"},
        "final": {"test": {"exact_match": 0.125, "n": 347}, "validation": {"loss": 0.71, "exact_match": 0.1, "n": 40}},
    }
    if untuned:
        metrics["untuned"] = {"test": {"exact_match": 0.081, "n": 347}, "validation": {"exact_match": 0.05, "n": 40}}
    return metrics


def test_summary_of_a_classification_run_on_the_cpu():
    assert format_summary(classification_metrics()).splitlines() == [
        "adapted blocks [2]: 1 of 3 (lora)",
        "  trainable parameters  3,650 of 35,394 (10.31%)",
        "  adapter               3,584 (33.3% of all-layer LoRA: 10,752)",
        "  head                  66",
        "  train time            0.4 s (820 tokens/s)",
        "  steps                 3 (1 epoch)",
        "  peak memory           1.50 GiB (host RSS)",
        "  train loss            0.6927",
        "  validation",
        "    accuracy            50.0%",
        "    loss                0.6932",
    ]


def test_summary_of_a_causal_lm_run_on_a_gpu_against_the_untuned_model():
    assert format_summary(causal_metrics(untuned=True)).splitlines() == [
        "adapted blocks [0, 5, 13, 29]: 4 of 30 (lora)",
        "  trainable parameters  1,638,400 of 134,515,008 (1.22%)",
        "  adapter               1,638,400 (13.3% of all-layer LoRA: 12,288,000)",
        "  head                  0",
        "  train time            1 h 02 min",
        "  steps                 1,250 (0.5 epochs)",
        "  resumed from          RUN/checkpoints/checkpoint-1000",
        "  peak memory           18.00 GiB (GPU allocated)",
        "  train loss            0.4123",
        "  test                  n=347",
        "    exact_match         12.5% (untuned 8.1%)",
        "  validation            n=40",
        "    exact_match         10.0% (untuned 5.0%)",
        "    loss                0.7100",
    ]
    without = format_summary(causal_metrics(untuned=False)).splitlines()
    assert "    exact_match         12.5%" in without and not any("untuned" in line for line in without)


def test_summary_edge_cases_are_plain_text():
    full = {**classification_metrics(), "method": "full", "cost": {"full_fine_tuning": True, "trainable_params": 35460}, "final": {}}
    text = format_summary(full)
    assert "  adapter               none (full fine-tuning)" in text.splitlines()
    assert "  evaluation            none (no evaluation split)" in text.splitlines()
    units = {**classification_metrics(), "cost": {**classification_metrics()["cost"], "units": ["2.attention"]}}
    assert "  units                 1: 2.attention" in format_summary(units).splitlines()
    nan = classification_metrics()
    nan["train"]["train_loss"] = float("nan")
    nan["final"]["validation"]["accuracy"] = None
    assert "  train loss            nan" in format_summary(nan).splitlines() and "    accuracy            —" in format_summary(nan).splitlines()
    assert format_summary({"final": {}}).splitlines()[0] == "adapted blocks []: 0 (?)"  # nothing else known: no crash
    for metrics in (classification_metrics(), causal_metrics(True), full, units, nan):
        text = format_summary(metrics)
        assert "\x1b[" not in text and "\r" not in text and not text.endswith("\n")


def test_print_result_prints_the_summary_then_the_run_directory(capsys):
    from types import SimpleNamespace

    from lwlora.commands.train import print_result

    print_result(SimpleNamespace(metrics=classification_metrics(), run_dir="RUN"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "adapted blocks [2]: 1 of 3 (lora)" and out[-1] == "wrote RUN" and len(out) == 12


# --------------------------------------------------------------------------- loss_curve.png


HISTORY = [
    {"loss": 0.6901, "step": 1, "epoch": 0.33}, {"loss": 0.6957, "step": 2}, {"loss": 0.6922, "step": 3},
    {"eval_validation_loss": 0.6932, "eval_validation_accuracy": 0.5, "step": 3},
    {"train_loss": 0.6927, "train_runtime": 0.1, "step": 3},
    {"eval_loss": 0.6932, "eval_accuracy": 0.5, "step": 3},  # the final trainer.evaluate: the same evaluation again
]


def _visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_loss_curve_of_three_steps_has_integer_step_ticks_and_a_distinct_eval_loss(tmp_path):
    fig = loss_curve_figure(HISTORY, title="classification · lora · blocks [2]")
    (ax,) = fig.axes
    assert _visible_ticks(ax) == [1.0, 2.0, 3.0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
    train, evaluation = ax.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3] and train.get_marker() == "o"
    assert list(evaluation.get_xdata()) == [3]  # one point: the final evaluate is not drawn twice
    assert evaluation.get_marker() not in (None, "None", "") and evaluation.get_color() != train.get_color()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss (validation)"]
    assert plot_loss_curve(HISTORY, tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == PNG


def test_a_single_logged_step_is_still_visible():
    fig = loss_curve_figure([{"loss": 1.5, "step": 1}])
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and line.get_markersize() > 0
    assert _visible_ticks(ax) == [1.0]
    long = loss_curve_figure([{"loss": 1.0 / s, "step": s} for s in range(1, 500)])
    assert all(float(t).is_integer() for t in long.axes[0].get_xticks())
    empty = loss_curve_figure([])
    assert "no loss logged" in empty.axes[0].texts[0].get_text()


# --------------------------------------------------------------------------- importance.png and stability.png


def block_selection(**overrides) -> LayerSelection:
    values = dict(
        model="tiny-bert", layers_path="encoder.layer", num_layers=4, selected=[1, 3], num_samples=24,
        layers=[LayerRecord(0, None, None, None, True, reason="constant"), LayerRecord(1, 0.87, 0.87, 0.13, False),
                LayerRecord(2, 0.95, 0.95, 0.05, False), LayerRecord(3, 0.90, 0.90, 0.10, False)],
    )
    values.update(overrides)
    return LayerSelection(**values)


def stability_report() -> StabilityReport:
    layers = [LayerStability(0, 0.0, None, None, None, 20, None), LayerStability(1, 1.0, 0.10, 0.16, 0.13, 0, 0.13),
              LayerStability(2, 0.4, 0.03, 0.07, 0.05, 0, 0.05), LayerStability(3, 0.6, 0.07, 0.12, 0.10, 0, 0.10)]
    return StabilityReport(20, 0.95, layers, [2, 3], 0.8, 0.9, 0.8, 1.0, [], num_samples=24, scorer="cka")


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() is not None for t in ax.get_legend().get_texts()]


def _bar_fills(ax) -> list[tuple]:
    return [tuple(patch.get_facecolor()) for patch in ax.patches if patch.get_width() < 1]  # bars, not a band across the axes


def test_importance_and_stability_share_colours_and_have_legends(tmp_path):
    selection = block_selection()
    importance = importance_figure(selection)
    stability = stability_figure(stability_report(), selection.importances, selection.selected)
    expected = [to_rgba(colors.FROZEN), to_rgba(colors.SELECTED), to_rgba(colors.FROZEN), to_rgba(colors.SELECTED)]
    assert _bar_fills(importance.axes[0]) == expected
    assert _bar_fills(stability.axes[0]) == expected

    assert _legend(importance) == ["selected (2 of 4 blocks)", "frozen", "degenerate (no score)"]
    assert _legend(stability) == ["selected (2 of 4 blocks)", "frozen", "degenerate (no score)", "95% bootstrap interval",
                                  "unstable: 20% < frequency < 80%", "selection frequency (right axis)"]
    for fig in (importance, stability):  # the legend's swatches are the bars' colours
        handles = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None).legend_handles
        assert tuple(handles[0].get_facecolor()) == to_rgba(colors.SELECTED) and tuple(handles[1].get_facecolor()) == to_rgba(colors.FROZEN)
        assert handles[2].get_marker() == colors.DEGENERATE_MARKER["marker"] and handles[2].get_color() == colors.DEGENERATE
    degenerate = [line for line in importance.axes[0].get_lines() if line.get_marker() == "x"]
    assert len(degenerate) == 1 and list(degenerate[0].get_xdata()) == [0]

    assert plot_importance(selection, tmp_path / "importance.png").read_bytes()[:8] == PNG
    assert plot_stability(stability_report(), selection.importances, selection.selected, tmp_path / "stability.png").read_bytes()[:8] == PNG


def test_sublayer_units_get_two_hatched_bars_per_block():
    units = [
        {"block": b, "part": part, "importance": None if (b, part) == (0, "attention") else imp, "degenerate": (b, part) == (0, "attention"), "selected": chosen}
        for b, (a_imp, m_imp, a_sel, m_sel) in enumerate([(0.0, 0.01, False, True), (0.13, 0.002, True, False), (0.05, 0.001, False, False)])
        for part, imp, chosen in (("attention", a_imp, a_sel), ("mlp", m_imp, m_sel))
    ]
    selection = block_selection(num_layers=3, layers=block_selection().layers[:3], selected=[0, 1], units=units)
    fig = importance_figure(selection)
    bars, strip = fig.axes
    assert [p.get_hatch() for p in bars.patches] == [colors.UNIT_HATCH["attention"]] * 3 + [colors.UNIT_HATCH["mlp"]] * 3
    assert [p.get_x() + p.get_width() / 2 for p in bars.patches] == pytest.approx([-0.2, 0.8, 1.8, 0.2, 1.2, 2.2])
    fills = [tuple(p.get_facecolor()) for p in bars.patches]
    assert fills == [to_rgba(c) for c in (colors.FROZEN, colors.SELECTED, colors.FROZEN, colors.SELECTED, colors.FROZEN, colors.FROZEN)]
    assert [tuple(p.get_facecolor()) for p in strip.patches] == fills  # the strip shows what a tiny bar cannot
    assert _legend(fig) == ["selected (2 of 6 units)", "frozen", "attention", "MLP", "degenerate (no score)"]


def test_a_rule_selection_is_drawn_as_its_blocks():
    rule = LayerSelection(model="m", layers_path="layers", num_layers=4, layers=[LayerRecord(i, None, None, None, False) for i in range(4)],
                          selected=[2, 3], scorer="last", similarity_name="none", pooling="none")
    fig = importance_figure(rule)
    (ax,) = fig.axes
    assert [tuple(p.get_facecolor()) for p in ax.patches] == [to_rgba(colors.FROZEN)] * 2 + [to_rgba(colors.SELECTED)] * 2
    assert "rule 'last'" in ax.get_title() and _legend(fig) == ["selected (2 of 4 blocks)", "frozen"]


def test_no_progress_also_silences_the_gguf_dequantization_bar(monkeypatch, capsys):
    """transformers draws the GGUF bar with a bare tqdm that disable_progress_bar() does not reach."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from lwlora import cli

    from tqdm.auto import tqdm

    monkeypatch.setattr(gguf_utils, "tqdm", tqdm)  # as transformers ships it (an earlier --no-progress in this process may have wrapped it); restored after the test
    for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    assert "de-quantizing" in capsys.readouterr().err  # drawn by default
    cli._disable_progress_bars()
    cli._disable_progress_bars()  # idempotent: not wrapped twice
    for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    assert capsys.readouterr().err == ""
    import transformers

    transformers.utils.logging.enable_progress_bar()
    import datasets

    datasets.enable_progress_bars()


def test_the_cli_hides_transformers_v6_deprecations_and_nothing_else():
    import warnings

    from lwlora import cli

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet_stack_deprecations()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("`foo` is deprecated and will be removed in v7.", FutureWarning)
        warnings.warn("something is deprecated and will be removed in v6.", UserWarning)
    assert [str(w.message) for w in caught] == ["`foo` is deprecated and will be removed in v7.", "something is deprecated and will be removed in v6."]


def test_library_log_lines_carry_no_ansi_codes_in_a_log_file():
    """transformers' weight-loading report has bold codes in its title even when stderr is a file."""
    import io
    import logging

    import transformers

    from lwlora import cli

    cli._plain_library_logs()
    cli._plain_library_logs()  # idempotent: one filter per handler
    default = transformers.utils.logging._default_handler  # the handler transformers logs through
    assert sum(isinstance(f, cli._PlainText) for f in default.filters) == 1
    log_file = io.StringIO()
    handler = logging.StreamHandler(log_file)
    handler.addFilter(cli._PlainText(handler))
    logger = logging.getLogger("lwlora-test-plain")
    logger.addHandler(handler)
    try:
        logger.warning("\x1b[1mLlamaForCausalLM LOAD REPORT\x1b[0m from: %s", "/m")
    finally:
        logger.removeHandler(handler)
    assert log_file.getvalue() == "LlamaForCausalLM LOAD REPORT from: /m\n"


def test_a_terminal_keeps_its_colours():
    import logging

    from lwlora import cli

    class Terminal:
        def isatty(self):
            return True

    handler = logging.StreamHandler(Terminal())
    record = logging.LogRecord("transformers", logging.WARNING, __file__, 1, "\x1b[1mbold\x1b[0m", None, None)
    assert cli._PlainText(handler).filter(record) and record.getMessage() == "\x1b[1mbold\x1b[0m"


def test_tokenizing_bar_names_a_split_once_when_it_is_named_after_the_task(monkeypatch):
    """The built-in gsm-symbolic evaluation split is called "gsm-symbolic": its bar read
    "tokenizing gsm-symbolic gsm-symbolic". Other splits keep "tokenizing NAME SPLIT"."""
    from lwlora.tasks import instruction

    seen = []
    monkeypatch.setattr(instruction, "tokenize_causal", lambda records, *a, desc, **k: seen.append(desc) or list(records))
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    instruction._assemble("gsm-symbolic", tokenizer, rows, {"gsm-symbolic": rows, "validation": rows}, {}, source="s", instruction_field=None, output_field=None,
                          max_length=32, max_train_samples=None, max_eval_samples=None, selection_samples=2, seed=0, packing=False)
    assert seen[:3] == ["tokenizing gsm-symbolic train", "tokenizing gsm-symbolic", "tokenizing gsm-symbolic validation"]
