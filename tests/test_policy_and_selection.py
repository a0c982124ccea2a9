"""Selection policies, the paper preset, and the selection.json round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwlora.errors import ConfigError
from lwlora.selection.policy import SelectionPolicy, paper_policy, rank_blocks, select_blocks
from lwlora.selection.artifact import SCHEMA_VERSION, LayerRecord, LayerSelection


def test_ratio_is_floor_of_ratio_times_layers():
    importances = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.8]
    selected, warnings = select_blocks(importances, SelectionPolicy(ratio=0.5))
    assert selected == [1, 3, 6]  # floor(3.5) = 3 most important
    assert warnings == []
    assert select_blocks(importances, SelectionPolicy())[0] == [1, 3, 6]  # default ratio 0.5


def test_top_k_include_exclude():
    importances = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert select_blocks(importances, SelectionPolicy(num_layers=2))[0] == [0, 1]
    assert select_blocks(importances, SelectionPolicy(num_layers=2, exclude=(0,)))[0] == [1, 2]
    assert select_blocks(importances, SelectionPolicy(num_layers=2, include=(5,)))[0] == [0, 5]
    assert select_blocks(importances, SelectionPolicy(layers=(4, 2)))[0] == [2, 4]


def test_degenerate_blocks_never_rank_first():
    importances = [None, 0.2, 0.1, 0.3]
    assert rank_blocks(importances) == [3, 1, 2, 0]
    selected, warnings = select_blocks(importances, SelectionPolicy(num_layers=3))
    assert selected == [1, 2, 3] and warnings == []
    selected, warnings = select_blocks(importances, SelectionPolicy(num_layers=4))
    assert selected == [0, 1, 2, 3]
    assert "degenerate" in warnings[0] and "[0]" in warnings[0]


def test_tie_breaking_is_deterministic_both_ways():
    importances = [0.5, 0.5, 0.5, 0.1]
    assert select_blocks(importances, SelectionPolicy(num_layers=2))[0] == [0, 1]
    assert select_blocks(importances, SelectionPolicy(num_layers=2, tie_break="higher-index"))[0] == [1, 2]


def reference_script_selection(cka: list[float], ratio: float, encoder: bool) -> list[int]:
    """The reference scripts' loop, rewritten: repeatedly take the lowest remaining CKA, ties to
    the later index (``>=``); encoders then drop the first-ranked block."""
    order: list[int] = []
    while len(order) < len(cka):
        best, best_index = 2.0, -1
        for i, value in enumerate(cka):
            if i not in order and best >= value:
                best, best_index = value, i
        order.append(best_index)
    k = int(ratio * len(cka) // 1)
    return sorted(order[1 : k + 1] if encoder else order[:k])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.1, 0.2, 0.5, 0.7, 0.9, 0.95]), min_size=2, max_size=16), st.sampled_from([0.25, 0.5, 0.75]))
def test_paper_preset_reproduces_reference_scripts(cka, ratio):
    """Decoder: identical to the reference. Encoder: the reference's CKA of block 0 is 0 (0/0
    clamped), so it ranks first and is dropped; lwlora excludes block 0 instead."""
    if int(ratio * len(cka)) < 1:
        return
    importances = [1.0 - c for c in cka]
    decoder, _ = select_blocks(importances, paper_policy("decoder", ratio=ratio))
    assert decoder == reference_script_selection(cka, ratio, encoder=False)
    encoder_cka = [0.0] + cka[1:]  # what the reference computes for a constant CLS at the embeddings
    if int(ratio * len(cka)) <= len(cka) - 1:
        encoder, _ = select_blocks([None] + importances[1:], paper_policy("encoder", ratio=ratio))
        assert encoder == reference_script_selection(encoder_cka, ratio, encoder=True)
        assert 0 not in encoder


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=1, max_size=40), st.integers(1, 40))
def test_selection_size_and_membership(importances, k):
    if k > len(importances):
        with pytest.raises(ConfigError, match="--num-layers"):
            select_blocks(importances, SelectionPolicy(num_layers=k))
        return
    selected, _ = select_blocks(importances, SelectionPolicy(num_layers=k))
    assert len(selected) == k and selected == sorted(set(selected))
    # every selected scored block is at least as important as every unselected scored block
    chosen = [importances[i] for i in selected if importances[i] is not None]
    rest = [importances[i] for i in range(len(importances)) if i not in selected and importances[i] is not None]
    if chosen and rest:
        assert min(chosen) >= max(rest)
    # degenerate blocks are only taken when no scored block is left
    if any(importances[i] is None for i in selected):
        assert not rest


@pytest.mark.parametrize(
    "policy_kwargs, importances, flag",
    [
        ({"ratio": 0.0}, [0.1, 0.2], "--ratio"),
        ({"ratio": 1.5}, [0.1, 0.2], "--ratio"),
        ({"ratio": 0.1}, [0.1, 0.2, 0.3], "--ratio"),  # floor(0.3) = 0 blocks
        ({"num_layers": 4}, [0.1, 0.2, 0.3], "--num-layers"),
        ({"num_layers": 0}, [0.1], "--num-layers"),
        ({"layers": (0, 7)}, [0.1, 0.2], "--layers"),
        ({"include": (1,), "exclude": (1,)}, [0.1, 0.2], "--exclude"),
        ({"include": (9,)}, [0.1, 0.2], "--include"),
        ({"num_layers": 3, "exclude": (0,)}, [0.1, 0.2, 0.3], "--exclude"),
        ({"ratio": 0.5, "num_layers": 2}, [0.1, 0.2], "--"),
    ],
)
def test_bad_policies_name_the_flag(policy_kwargs, importances, flag):
    with pytest.raises(ConfigError) as info:
        select_blocks(importances, SelectionPolicy(**policy_kwargs))
    assert info.value.flag.startswith(flag)


def make_selection(**overrides) -> LayerSelection:
    layers = [
        LayerRecord(index=0, cka=None, similarity=None, importance=None, degenerate=True, reason="block input: constant"),
        LayerRecord(index=1, cka=0.8, similarity=0.8, importance=0.2, degenerate=False),
        LayerRecord(index=2, cka=0.5, similarity=0.5, importance=0.5, degenerate=False),
        LayerRecord(index=3, cka=0.9, similarity=0.9, importance=0.1, degenerate=False),
    ]
    fields = dict(model="some/model", layers_path="model.layers", num_layers=4, layers=layers, selected=[2, 1], block_linear_modules=["self_attn.q_proj"])
    fields.update(overrides)
    return LayerSelection(**fields)


def test_selection_json_round_trip(tmp_path):
    selection = make_selection()
    assert selection.selected == [1, 2]
    assert selection.one_hot == "0110"
    path = selection.save(tmp_path / "out")
    assert path.name == "selection.json"
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("model", "layers_path", "num_layers", "scorer", "pooling", "num_samples", "data_fingerprint", "layers", "selected", "one_hot", "versions", "timings"):
        assert key in data
    assert data["layers"][0] == {"index": 0, "cka": None, "similarity": None, "importance": None, "degenerate": True, "reason": "block input: constant", "fallback": None}
    loaded = LayerSelection.load(tmp_path / "out")
    assert loaded.to_json() == selection.to_json()
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic write left no temporary file


def test_selection_json_rejects_bad_documents():
    data = make_selection().to_json()
    with pytest.raises(ValueError, match="schema_version"):
        LayerSelection.from_json({**data, "schema_version": 99})
    with pytest.raises(ValueError, match="one_hot"):
        LayerSelection.from_json({**data, "one_hot": "1111"})
    with pytest.raises(ValueError, match="outside"):
        make_selection(selected=[7])
    with pytest.raises(ValueError, match="records"):
        make_selection(num_layers=5)
