"""Table-driven tests over tiny random models of every supported architecture (see tiny_models.py).

a. discovery: the language-tower block stack (path, block count, class) of every model class; MoE
   layer lists, never expert lists; VLM towers; ambiguous / missing stacks and ``layers_path``.
b. capture: hooked block inputs/outputs equal the pooled ``output_hidden_states`` (except the last
   entry, which decoders take after the final norm); ``blocks=[0]`` stops the forward early.
c. adapters: every PEFT method puts adapters on exactly the selected blocks, with ``"auto"`` and
   with explicit module names; selections made on bare models apply to head models; VLM adapters
   stay in their tower; ``verify`` reports tampered placements.
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import CASES, INFOS, ModelInfo, build, cases, llava_image_batch
from torch import nn

from lwlora.blocks import find_block_stacks, get_module, resolve_block_stack
from lwlora.selection.capture import POOLINGS, capture_block_representations, pool
from lwlora.errors import ConfigError
from lwlora.adapters.placement import METHODS, AdapterPlacementError, adapted_module_names, apply_selection, build_peft_config, verify
from lwlora.selection.artifact import LayerRecord, LayerSelection

ENCODERS = cases(kind="encoder")
DECODERS = cases(kind="decoder")
VLMS = cases(vlm=True)
HEAD_MODELS_WITH_BASE = cases(with_base=True)
MOE = cases(arch="mixtral")

# Tolerances: hooks and output_hidden_states read the very same tensors, so they agree to the bit;
# adapters at initialisation leave the function unchanged up to the SVD/QR round-off of PiSSA/OLoRA.
TIGHT = {"rtol": 1e-5, "atol": 1e-6}
INIT = {"rtol": 1e-4, "atol": 1e-5}

def _params(test: str, names, methods=None):
    """Readable parametrisation ids: ``name`` or ``name-method``. ``test`` names the test family."""
    out = []
    for name in names:
        for method in methods or [None]:
            values = (name,) if method is None else (name, method)
            out.append(pytest.param(*values, id=name if method is None else f"{name}-{method}"))
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def linear_names(block: nn.Module) -> set[str]:
    """Block-relative names of the adaptable linear layers, found independently of lwlora."""
    from transformers.pytorch_utils import Conv1D

    return {name for name, module in block.named_modules() if name and isinstance(module, (nn.Linear, Conv1D))}


def make_selection(stack, selected, info: ModelInfo, *, layers_path: str | None = None) -> LayerSelection:
    return LayerSelection(
        model=f"tiny/{info.name}",
        layers_path=layers_path or stack.path,
        num_layers=stack.num_layers,
        layers=[
            LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False)
            for i in range(stack.num_layers)
        ],
        selected=list(selected),
        model_kind=info.kind,
        tower=stack.tower,
        pooling=info.default_pooling,
        block_linear_modules=stack.block_linear_modules(),
    )


def adapters_by_block(names: list[str], stack_path: str) -> dict[int, set[str]]:
    """``{block index: {block-relative names}}``; fails on any adapter outside ``stack_path``."""
    pattern = re.compile(rf"{re.escape(stack_path)}\.(\d+)\.(.+)")
    out: dict[int, set[str]] = {}
    outside = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            outside.append(name)
            continue
        out.setdefault(int(match.group(1)), set()).add(match.group(2))
    assert not outside, f"adapters outside {stack_path}: {outside}"
    return out


def first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]


def hidden_states(model: nn.Module, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    states = out.hidden_states
    assert states is not None and len(states) > 1, "model returned no hidden states"
    return states


# Toy modules for discovery edge cases -------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))


class _TwoLanguageStacks(nn.Module):
    """An encoder-decoder-like model: two language stacks, neither preferred."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([_Block() for _ in range(2)])
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([_Block() for _ in range(3)])


class _NoStack(nn.Module):
    """Linear layers only; a ModuleList of bare Linear layers is not a block stack."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.empty = nn.ModuleList()


class _Expert(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d)


class _MoEBlock(nn.Module):
    """A v4-style MoE block: experts in a ModuleList, itself a candidate stack."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.gate = nn.Linear(d, 4, bias=False)
        self.experts = nn.ModuleList([_Expert(d) for _ in range(4)])


class _ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_MoEBlock() for _ in range(3)])


# ---------------------------------------------------------------------------------------------
# a. Discovery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_discovers_language_stack(name):
    model, info = build(name)
    assert type(model).__name__ == info.model_class
    assert model.config.model_type == info.model_type

    stack = resolve_block_stack(model)
    assert stack.path == info.layers_path
    assert stack.num_layers == info.num_layers
    assert stack.block_class == info.block_class
    assert stack.tower == "language"
    assert stack.blocks is get_module(model, info.layers_path)

    towers = [s.tower for s in find_block_stacks(model)]
    assert towers.count("language") == 1
    assert towers.count("vision") == (1 if info.is_vlm else 0)

    # block_linear_modules (what "auto" adapts) is every linear layer of the blocks.
    expected = set().union(*(linear_names(block) for block in stack.blocks))
    assert set(stack.block_linear_modules()) == expected
    assert expected, "no adaptable linear layer found"


@pytest.mark.parametrize("name", CASES)
def test_layers_path_override_matches_discovery(name):
    model, info = build(name)
    stack = resolve_block_stack(model, layers_path=info.layers_path)
    assert stack.path == info.layers_path
    assert stack.blocks is resolve_block_stack(model).blocks
    assert stack.tower == "language"


@pytest.mark.parametrize("name", MOE)
def test_moe_stack_is_the_layer_list_never_experts(name):
    model, info = build(name)
    stack = resolve_block_stack(model)
    assert stack.path == info.layers_path and stack.path.endswith("layers")
    assert stack.block_class == "MixtralDecoderLayer"
    for candidate in find_block_stacks(model):
        assert "expert" not in candidate.path


def test_nested_expert_lists_are_not_stacks():
    model = _ToyMoE()
    assert [s.path for s in find_block_stacks(model)] == ["layers"]
    stack = resolve_block_stack(model)
    assert stack.path == "layers" and stack.num_layers == 3
    # The experts' linear layers are inside the blocks, so "auto" adapts them.
    assert "experts.3.w2" in stack.block_linear_modules()


@pytest.mark.parametrize("name", VLMS)
def test_vlm_towers(name):
    model, info = build(name)
    language = resolve_block_stack(model)
    assert (language.path, language.tower, language.num_layers) == (info.layers_path, "language", info.num_layers)

    vision = resolve_block_stack(model, tower="vision")
    assert (vision.path, vision.tower, vision.num_layers) == (info.vision_layers_path, "vision", info.num_vision_layers)
    assert vision.blocks is not language.blocks

    # layers_path wins and keeps the tower of its path
    override = resolve_block_stack(model, layers_path=info.vision_layers_path)
    assert override.blocks is vision.blocks and override.tower == "vision"

    with pytest.raises(ConfigError, match="--layers-path") as excinfo:
        resolve_block_stack(model, tower="audio")
    assert info.layers_path in str(excinfo.value) and info.vision_layers_path in str(excinfo.value)


def test_text_model_has_no_vision_tower():
    model, _ = build("llama-lm")
    with pytest.raises(ConfigError) as excinfo:
        resolve_block_stack(model, tower="vision")
    assert excinfo.value.flag == "--layers-path"
    assert "model.layers" in str(excinfo.value)

    with pytest.raises(ConfigError) as excinfo:
        resolve_block_stack(model, tower="speech")
    assert excinfo.value.flag == "--tower"


def test_two_language_stacks_are_ambiguous():
    model = _TwoLanguageStacks()
    with pytest.raises(ConfigError) as excinfo:
        resolve_block_stack(model)
    message = str(excinfo.value)
    assert excinfo.value.flag == "--layers-path"
    assert "--layers-path" in message
    assert "encoder.layers (2 × _Block" in message and "decoder.layers (3 × _Block" in message

    assert resolve_block_stack(model, layers_path="encoder.layers").num_layers == 2
    assert resolve_block_stack(model, layers_path="decoder.layers").num_layers == 3


def test_no_stack_is_an_error():
    model = _NoStack()
    assert find_block_stacks(model) == []
    with pytest.raises(ConfigError) as excinfo:
        resolve_block_stack(model)
    assert excinfo.value.flag == "--layers-path"
    assert "--layers-path" in str(excinfo.value) and "none found" in str(excinfo.value)


@pytest.mark.parametrize(
    "bad_path, why",
    [
        ("model.nope", "is not a module"),
        ("model.layers.7", "is not a module"),
        ("model.norm", "not a non-empty ModuleList"),
        ("model.layers.0", "not a non-empty ModuleList"),
    ],
    ids=["missing", "index-out-of-range", "norm", "single-block"],
)
def test_bad_layers_path(bad_path, why):
    model, _ = build("llama-lm")
    with pytest.raises(ConfigError) as excinfo:
        resolve_block_stack(model, layers_path=bad_path)
    message = str(excinfo.value)
    assert excinfo.value.flag == "--layers-path"
    assert why in message
    assert "candidates: model.layers (3 × LlamaDecoderLayer" in message


# ---------------------------------------------------------------------------------------------
# b. Capture hooks vs output_hidden_states
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("name", [n for n in CASES if INFOS[n].supports_hidden_states])
def test_hooks_match_hidden_states(name, pooling):
    model, info = build(name)
    batch = info.make_batch()
    mask = batch["attention_mask"]
    stack = resolve_block_stack(model)
    states = hidden_states(model, batch)
    assert len(states) == info.num_layers + 1
    assert all(torch.isfinite(s).all() for s in states)

    reps = capture_block_representations(model, stack, [batch], pooling=pooling, progress=False)
    assert reps.blocks == list(range(info.num_layers))
    assert reps.num_samples == mask.shape[0]

    # Input of block 0 = the embeddings output = hidden_states[0].
    torch.testing.assert_close(reps.inputs[0], pool(states[0], mask, pooling), **TIGHT)
    # Outputs of blocks 0..L-2 = hidden_states[1..L-1]; the last entry is excluded (final norm).
    for i in range(info.num_layers - 1):
        torch.testing.assert_close(reps.outputs[i], pool(states[i + 1], mask, pooling), **TIGHT, msg=f"block {i} output")
        # and each block reads what the previous one wrote
        torch.testing.assert_close(reps.inputs[i + 1], reps.outputs[i], **TIGHT, msg=f"block {i + 1} input")
    for matrix in reps.inputs + reps.outputs:
        assert matrix.dtype == torch.float32
        assert matrix.shape == (mask.shape[0], model.config.get_text_config().hidden_size)


@pytest.mark.parametrize("name", [n for n in DECODERS if INFOS[n].final_norm])
def test_last_hidden_state_is_after_the_final_norm(name):
    """Why the last hidden_states entry is excluded above: decoders return it after their final norm,
    which the hooks (correctly) do not see."""
    model, info = build(name)
    batch = info.make_batch()
    mask = batch["attention_mask"]
    stack = resolve_block_stack(model)
    states = hidden_states(model, batch)
    final_norm = get_module(model, info.final_norm)
    for pooling in ("last", "cls"):
        reps = capture_block_representations(model, stack, [batch], pooling=pooling, progress=False)
        hooked_last = reps.outputs[-1]
        reported_last = pool(states[-1], mask, pooling)
        assert not torch.allclose(hooked_last, reported_last, rtol=1e-3, atol=1e-3)
        # ... and the difference is exactly the final norm (per token, so it commutes with picking one)
        with torch.no_grad():
            torch.testing.assert_close(final_norm(hooked_last), reported_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_last_hidden_state_is_the_last_block_output(name):
    """Encoders without a final norm: the last hidden_states entry is the last block's output."""
    model, info = build(name)
    assert info.final_norm is None
    batch = info.make_batch()
    states = hidden_states(model, batch)
    reps = capture_block_representations(model, resolve_block_stack(model), [batch], pooling="mean", progress=False)
    torch.testing.assert_close(reps.outputs[-1], pool(states[-1], batch["attention_mask"], "mean"), **TIGHT)


@pytest.mark.parametrize("name", CASES)
def test_capture_stops_after_the_last_needed_block(name):
    model, info = build(name)
    batch = info.make_batch()
    stack = resolve_block_stack(model)
    full = capture_block_representations(model, stack, [batch], pooling=info.default_pooling, progress=False)

    sentinels: dict[str, nn.Module] = {f"{stack.path}.{i}": stack.blocks[i] for i in range(1, stack.num_layers)}
    if info.final_norm:
        sentinels[info.final_norm] = get_module(model, info.final_norm)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        sentinels["output embeddings"] = head
    for attr in ("classifier", "score", "pooler"):
        if isinstance(getattr(model, attr, None), nn.Module):
            sentinels[attr] = getattr(model, attr)
    assert info.is_encoder or info.final_norm in sentinels

    called: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_args, _label=label: called.append(_label))
        for label, module in sentinels.items()
    ]
    try:
        reps = capture_block_representations(model, stack, [batch], pooling=info.default_pooling, blocks=[0], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert called == [], f"ran after block 0: {called}"
    assert reps.blocks == [0]
    torch.testing.assert_close(reps.outputs[0], full.outputs[0], **TIGHT)
    torch.testing.assert_close(reps.inputs[0], full.inputs[0], **TIGHT)
    assert not model.training


def test_capture_reads_the_llava_vision_tower_with_images():
    model, info = build("llava")
    vision = resolve_block_stack(model, tower="vision")
    batch = llava_image_batch(info)
    with torch.no_grad():
        states = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    # Vision tokens are CLS + patches, so the text attention mask does not apply to them ...
    with pytest.raises(ValueError, match="does not match"):
        capture_block_representations(model, vision, [batch], pooling="mean", progress=False)
    # ... and without a mask every vision token counts.
    for pooling in POOLINGS:
        reps = capture_block_representations(model, vision, [batch], pooling=pooling, mask_key="no_mask", progress=False)
        torch.testing.assert_close(reps.inputs[0], pool(states[0], None, pooling), **TIGHT)
        for i in range(vision.num_layers - 1):
            torch.testing.assert_close(reps.outputs[i], pool(states[i + 1], None, pooling), **TIGHT)

    # Text-only batches never reach the vision tower: a clear error, not empty statistics.
    with pytest.raises(RuntimeError, match="did not run"):
        capture_block_representations(model, vision, [info.make_batch()], pooling="mean", mask_key="no_mask", progress=False)


# ---------------------------------------------------------------------------------------------
# c. Adapter placement
# ---------------------------------------------------------------------------------------------


#: PEFT 0.21's EVA reshapes every layer input as (batch, tokens, features); these architectures feed
#: some linears otherwise (OPT's flattened MLP input, DeBERTa's relative-position projections)
EVA_CANNOT_INITIALISE = ("opt", "deberta-v2")


@pytest.mark.parametrize("name, method", _params("auto", CASES, METHODS))
def test_auto_adapts_every_linear_of_the_selected_blocks(name, method):
    model, info = build(name)
    stack = resolve_block_stack(model)
    selected = [0, 2]
    expected = {i: linear_names(stack.blocks[i]) for i in selected}
    batch = info.make_batch()
    with torch.no_grad():
        reference = first_output(model(**batch)).clone()

    selection = make_selection(stack, selected, info)
    if method == "olora" and info.arch == "gpt2":
        # PEFT's OLoRA init ignores fan_in_fan_out and corrupts GPT-2's Conv1D: refused up front.
        with pytest.raises(ConfigError, match="--method: olora cannot adapt Conv1D"):
            apply_selection(model, selection, method=method, r=2, target_modules="auto")
        return
    if method == "eva":  # EVA initialises from the layers' inputs on data: a few batches of the model's own kind
        init = [info.make_batch(), info.make_batch(seed=2)]
        if info.arch in EVA_CANNOT_INITIALISE:
            with pytest.raises(ConfigError, match="--method: PEFT's EVA could not initialise"):
                apply_selection(model, selection, method=method, r=2, target_modules="auto", init_batches=init)
            return
        peft_model = apply_selection(model, selection, method=method, r=2, target_modules="auto", init_batches=init)
        placed = adapters_by_block(adapted_module_names(peft_model), stack.path)
        # exactly the selected blocks' linears, less those EVA gave rank 0 (it removes, never adds)
        assert set(placed) <= set(expected) and all(placed[i] <= expected[i] for i in placed) and placed
        return
    peft_model = apply_selection(model, selection, method=method, r=2, target_modules="auto")

    placed = adapters_by_block(adapted_module_names(peft_model), stack.path)
    assert placed == expected
    verify(peft_model, selection, "auto")
    # Only adapter weights train.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    # At initialisation every method leaves the function unchanged (PiSSA/OLoRA up to round-off).
    with torch.no_grad():
        output = first_output(peft_model(**batch))
    torch.testing.assert_close(output, reference, **INIT)


@pytest.mark.parametrize("name", _params("explicit", CASES))
def test_explicit_targets_adapt_only_those_modules(name):
    model, info = build(name)
    stack = resolve_block_stack(model)
    targets = list(info.qv_targets)
    linear = linear_names(stack.blocks[1])
    expected = {n for n in linear if any(n == t or n.endswith("." + t) for t in targets)}
    assert expected and len(expected) < len(linear)

    selection = make_selection(stack, [1], info)
    peft_model = apply_selection(model, selection, method="lora", r=2, target_modules=targets)
    assert adapters_by_block(adapted_module_names(peft_model), stack.path) == {1: expected}
    with torch.no_grad():
        assert torch.isfinite(first_output(peft_model(**info.make_batch()))).all()


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-lm", "llava"])
def test_unknown_explicit_target_is_an_error(name):
    model, info = build(name)
    stack = resolve_block_stack(model)
    selection = make_selection(stack, [1], info)
    with pytest.raises(ConfigError) as excinfo:
        apply_selection(model, selection, method="lora", r=2, target_modules=["no_such_proj"])
    assert excinfo.value.flag == "--target-modules"
    assert "no_such_proj" in str(excinfo.value)


_TASK_TYPE = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "vlm": None}


@pytest.mark.parametrize("name", _params("base_to_head", HEAD_MODELS_WITH_BASE))
def test_selection_from_bare_model_applies_to_head_model(name):
    head_model, info = build(name)
    base_model, base_info = build(info.base_name)
    base_stack = resolve_block_stack(base_model)
    assert base_stack.path == base_info.layers_path != info.layers_path
    selection = make_selection(base_stack, [1], base_info)

    head_stack = resolve_block_stack(head_model)
    expected = {1: linear_names(head_stack.blocks[1])}
    config = build_peft_config(selection, r=2, model=head_model)
    assert config.target_modules.startswith(re.escape(info.layers_path) + r"\.")

    peft_model = apply_selection(
        head_model, selection, method="lora", r=2, target_modules="auto", task_type=_TASK_TYPE[info.head]
    )
    assert adapters_by_block(adapted_module_names(peft_model), info.layers_path) == expected
    with torch.no_grad():
        assert torch.isfinite(first_output(peft_model(**info.make_batch()))).all()


@pytest.mark.parametrize("name", _params("model_less", ["bert-seqcls", "gpt2-lm", "llama-lm", "llava", "mixtral-lm"]))
def test_config_built_without_the_model_restricts_blocks(name):
    """``build_peft_config(selection)`` (no model at hand: the unanchored expression) on the head model."""
    from peft import get_peft_model

    head_model, info = build(name)
    base_model, base_info = build(info.base_name)
    selection = make_selection(resolve_block_stack(base_model), [1], base_info)
    expected = {1: linear_names(resolve_block_stack(head_model).blocks[1])}
    peft_model = get_peft_model(head_model, build_peft_config(selection, r=2))
    assert adapters_by_block(adapted_module_names(peft_model), info.layers_path) == expected
    verify(peft_model, selection, "auto")


def test_olora_on_a_square_conv1d_is_refused():
    """GPT-2's attn.c_proj is a square Conv1D: PEFT's OLoRA would not crash there but silently
    change the model (its init ignores fan_in_fan_out), so lwlora refuses it."""
    model, info = build("gpt2")
    stack = resolve_block_stack(model)
    with pytest.raises(ConfigError, match="olora cannot adapt Conv1D"):
        apply_selection(model, make_selection(stack, [1], info), method="olora", r=2, target_modules=["attn.c_proj"])


def test_mixtral_regex_rewrite_is_contained_by_the_exclusion():
    """PEFT rewrites a regex target_modules of Mixtral-type models into bare names (dropping the
    block indices); the exclude_modules expression must keep adapters on the selected blocks."""
    from peft import get_peft_model

    model, info = build("mixtral-lm")
    stack = resolve_block_stack(model)
    config = build_peft_config(make_selection(stack, [1], info), r=2, model=model)
    assert config.exclude_modules
    peft_model = get_peft_model(model, config)
    assert set(adapters_by_block(adapted_module_names(peft_model), stack.path)) == {1}


@pytest.mark.parametrize("name", VLMS)
@pytest.mark.parametrize("targets", ["auto", "qv"])
def test_vlm_adapters_stay_in_the_language_tower(name, targets):
    model, info = build(name)
    language = resolve_block_stack(model)
    vision = resolve_block_stack(model, tower="vision")
    # The vision blocks have q_proj/v_proj too, so only the stack path keeps them out.
    assert {"self_attn.q_proj", "self_attn.v_proj"} <= linear_names(vision.blocks[1])

    target_modules = "auto" if targets == "auto" else list(info.qv_targets)
    selection = make_selection(language, [0, 2], info)
    peft_model = apply_selection(model, selection, method="lora", r=2, target_modules=target_modules)
    names = adapted_module_names(peft_model)
    assert names and not [n for n in names if "vision" in n]
    assert set(adapters_by_block(names, info.layers_path)) == {0, 2}


@pytest.mark.parametrize("name", VLMS)
def test_vision_tower_selection_stays_in_the_vision_tower(name):
    model, info = build(name)
    vision = resolve_block_stack(model, tower="vision")
    expected = {1: linear_names(vision.blocks[1])}
    selection = make_selection(vision, [1], info)
    assert selection.tower == "vision"
    peft_model = apply_selection(model, selection, method="lora", r=2, target_modules="auto")
    assert adapters_by_block(adapted_module_names(peft_model), info.vision_layers_path) == expected


def test_generic_layers_suffix_resolves_by_tower():
    """A selection recording just "layers" matches both LLaVA stacks (same suffix, same block
    count); the recorded tower decides."""
    model, info = build("llava")
    language = resolve_block_stack(model)
    assert language.num_layers == resolve_block_stack(model, tower="vision").num_layers
    expected = {1: linear_names(language.blocks[1])}
    selection = make_selection(language, [1], info, layers_path="layers")
    peft_model = apply_selection(model, selection, method="lora", r=2)
    assert adapters_by_block(adapted_module_names(peft_model), info.layers_path) == expected


@pytest.mark.parametrize("name", ["bert", "gpt2-lm", "llama-lm", "llava"])
def test_verify_reports_tampered_placement(name):
    model, info = build(name)
    stack = resolve_block_stack(model)
    applied = make_selection(stack, [0], info)
    peft_model = apply_selection(model, applied, method="lora", r=2)
    verify(peft_model, applied, "auto")

    claimed = make_selection(stack, [1], info)
    with pytest.raises(AdapterPlacementError) as excinfo:
        verify(peft_model, claimed, "auto")
    message = str(excinfo.value)
    assert "unexpected" in message and "missing" in message
    assert f"{stack.path}.0." in message.split("missing")[0]  # block 0's adapters are unexpected
    assert f"{stack.path}.1." in message.split("missing")[1]  # block 1's are missing

    # A selected block without adapters is reported as missing only.
    with pytest.raises(AdapterPlacementError, match="missing") as excinfo:
        verify(peft_model, make_selection(stack, [0, 1], info), None)
    assert "unexpected" not in str(excinfo.value)


def test_comma_separated_targets_as_the_cli_passes_them():
    model, info = build("llama-lm")
    stack = resolve_block_stack(model)
    peft_model = apply_selection(model, make_selection(stack, [2], info), r=2, target_modules="q_proj, v_proj")
    assert adapters_by_block(adapted_module_names(peft_model), stack.path) == {2: {"self_attn.q_proj", "self_attn.v_proj"}}


def test_eva_given_up_leaves_no_hooks_on_the_model(monkeypatch):
    """After EVA_MAX_PASSES passes without convergence apply_selection raises a --method error, and
    the model keeps none of PEFT's SVD hooks nor lwlora's counter (PEFT removes its hooks only when
    its loop ends normally): a later forward runs the plain model."""
    from peft.tuners.lora import eva

    from lwlora.adapters import placement

    model, info = build("llama-lm")
    stack = resolve_block_stack(model)
    init = [info.make_batch(), info.make_batch(seed=2)]
    monkeypatch.setattr(placement, "EVA_MAX_PASSES", 1)
    with pytest.raises(ConfigError, match="--method: PEFT's EVA did not converge in 1 passes over its 2 batches"):
        apply_selection(model, make_selection(stack, [0, 1], info), method="eva", r=2, target_modules="auto", init_batches=init)
    hooks = [(name, h) for name, m in model.named_modules() for h in m._forward_hooks.values() if isinstance(h, (eva.SVDHook, eva.HashHook))]
    assert hooks == [] and not model._forward_pre_hooks
