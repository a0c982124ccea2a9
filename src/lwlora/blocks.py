"""Find a model's transformer block stack(s): the ``nn.ModuleList`` of repeated blocks.

Discovery is generic: every non-empty ``ModuleList`` whose children are all of one class, each a
container of sub-modules with parameters, is a candidate, unless it sits inside a block of another
candidate (MoE expert lists, per-layer sub-lists), so Mixtral yields its layer index, never an
expert index. Candidates are assigned to a *tower* by their path (``vision``/``visual``/``image``
→ ``vision``, ``audio``/``speech`` → ``audio``, else ``language``); the language tower is the
default. Where a model cannot be inferred, ``LAYERS_PATH_REGISTRY`` names its stack by
``model_type``; ``layers_path`` (CLI ``--layers-path``) overrides everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lwlora.errors import ConfigError

TOWERS: tuple[str, ...] = ("language", "vision", "audio")

#: model_type -> {tower: layers_path} for models whose stack cannot be inferred generically.
#: Empty today: every architecture in the test table is discovered without it.
LAYERS_PATH_REGISTRY: dict[str, dict[str, str]] = {}

_TOWER_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vision", re.compile(r"(^|\.)(vision|visual|image|vit|vision_model|vision_tower|vision_encoder)[a-z_]*(\.|$)")),
    ("audio", re.compile(r"(^|\.)(audio|speech|whisper)[a-z_]*(\.|$)")),
)

#: Linear-like module classes that can carry a LoRA adapter. GPT-2 style ``Conv1D`` is matched by
#: name so that this module does not import transformers.
_LINEAR_CLASS_NAMES = {"Linear", "Conv1D", "NonDynamicallyQuantizableLinear"}


@dataclass(frozen=True)
class BlockStack:
    """A stack of transformer blocks. ``path`` is the dotted module path from the model root
    (e.g. ``"model.layers"``), ``blocks`` the ``ModuleList`` itself, ``tower`` its tower."""

    path: str
    blocks: nn.ModuleList = field(repr=False)
    tower: str = "language"

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def block_class(self) -> str:
        return type(self.blocks[0]).__name__

    def describe(self) -> str:
        return f"{self.path} ({self.num_layers} × {self.block_class}, {self.tower} tower)"

    def block_linear_modules(self) -> list[str]:
        """Names, relative to a block, of the linear layers of the blocks (union, sorted).

        E.g. ``["mlp.down_proj", ..., "self_attn.q_proj"]`` for Llama. These are what
        ``target_modules="auto"`` adapts.
        """
        names: set[str] = set()
        for block in self.blocks:
            for name, module in block.named_modules():
                if name and is_linear(module):
                    names.add(name)
        return sorted(names)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_CLASS_NAMES


def tower_of(path: str) -> str:
    lowered = path.lower()
    for tower, pattern in _TOWER_PATTERNS:
        if pattern.search(lowered):
            return tower
    return "language"


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    if any(type(child) is not first for child in module):
        return False
    child = module[0]
    # A block is a container of layers with parameters, not a bare Linear / Embedding / norm.
    has_submodules = any(True for _ in child.children())
    has_params = any(True for _ in child.parameters())
    return has_submodules and has_params


def find_block_stacks(model: nn.Module) -> list[BlockStack]:
    """All candidate block stacks of ``model``, outermost first, in module order."""
    candidates: list[tuple[str, nn.ModuleList]] = [
        (name, module) for name, module in model.named_modules() if name and _is_block_list(module)
    ]
    outermost: list[BlockStack] = []
    for name, module in candidates:
        nested = any(name.startswith(other + ".") for other, _ in candidates if other != name)
        if not nested:
            outermost.append(BlockStack(path=name, blocks=module, tower=tower_of(name)))
    return outermost


def _format_candidates(stacks: list[BlockStack]) -> str:
    if not stacks:
        return "none found"
    return "; ".join(s.describe() for s in stacks)


def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(path)
        module = getattr(module, part)
    return module


def resolve_block_stack(model: nn.Module, *, layers_path: str | None = None, tower: str = "language") -> BlockStack:
    """The block stack to score and adapt.

    Args:
        model: any ``nn.Module`` (a transformers model, bare or with a head, or a VLM).
        layers_path: dotted path of the ``ModuleList`` to use (CLI ``--layers-path``); wins over
            discovery.
        tower: which tower to take when discovery finds several (``language`` by default).

    Raises:
        ConfigError: no stack, an ambiguous choice, or a bad ``layers_path``; the message lists
            the candidates and names ``--layers-path``.
    """
    stacks = find_block_stacks(model)
    if layers_path is not None:
        try:
            module = get_module(model, layers_path)
        except AttributeError:
            raise ConfigError(
                "--layers-path", f"{layers_path!r} is not a module of this model; candidates: {_format_candidates(stacks)}"
            ) from None
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise ConfigError(
                "--layers-path",
                f"{layers_path!r} is a {type(module).__name__}, not a non-empty ModuleList of blocks; "
                f"candidates: {_format_candidates(stacks)}",
            )
        return BlockStack(path=layers_path, blocks=module, tower=tower_of(layers_path))

    if tower not in TOWERS:
        raise ConfigError("--tower", f"unknown tower {tower!r}; choose one of {', '.join(TOWERS)}")

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registered = LAYERS_PATH_REGISTRY.get(model_type or "", {}).get(tower)
    if registered is not None:
        for stack in stacks:
            if stack.path == registered or stack.path.endswith("." + registered):
                return stack

    in_tower = [s for s in stacks if s.tower == tower]
    if len(in_tower) == 1:
        return in_tower[0]
    if not in_tower:
        raise ConfigError(
            "--layers-path",
            f"found no {tower}-tower block stack in {type(model).__name__}; candidates: "
            f"{_format_candidates(stacks)}. Pass --layers-path with the dotted path of the blocks' ModuleList",
        )
    raise ConfigError(
        "--layers-path",
        f"{type(model).__name__} has {len(in_tower)} {tower}-tower block stacks: {_format_candidates(in_tower)}. "
        "Pass --layers-path to pick one",
    )
