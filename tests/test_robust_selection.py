"""Degeneracy fallback, outlier-robust (standardized) CKA and the near-identity diagnostics."""

from __future__ import annotations

import pytest
import torch

from lwlora import similarity
from lwlora.selection.capture import BlockRepresentations
from lwlora.errors import ConfigError
from lwlora.selection.policy import SelectionPolicy
from lwlora.selection.scoring import get_scorer
from lwlora.selection.pipeline import NEAR_IDENTITY_CKA, near_identity_diagnostics, score_representations
from lwlora.commands.select import SelectConfig, select_layers
from lwlora.selection.artifact import LayerRecord


def test_standardized_cka_ignores_per_feature_scale_but_plain_cka_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 16, generator=g, dtype=torch.float64) + torch.randn(64, 16, generator=g, dtype=torch.float64)
    scale = torch.ones(16, dtype=torch.float64)
    scale[3] = 300.0  # one "massive activation" feature
    plain = get_scorer("cka")
    robust = get_scorer("cka", feature_norm="standardize")
    assert abs(plain(x * scale, y).similarity - plain(x, y).similarity) > 1e-2
    assert robust(x * scale, y).similarity == pytest.approx(robust(x, y).similarity, abs=1e-10)
    z = similarity.standardize_features(x * scale)
    torch.testing.assert_close(z.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-10, rtol=0)


def test_massive_shared_dimension_hides_block_changes_from_plain_cka():
    """A huge dimension shared by input and output makes every block look like identity."""
    g = torch.Generator().manual_seed(1)
    n, d = 128, 32
    shared = torch.randn(n, 1, generator=g, dtype=torch.float64) * 1000
    x = torch.cat([shared, torch.randn(n, d - 1, generator=g, dtype=torch.float64)], dim=1)
    y = torch.cat([shared, torch.randn(n, d - 1, generator=g, dtype=torch.float64)], dim=1)  # the rest is unrelated
    assert get_scorer("cka")(x, y).similarity > NEAR_IDENTITY_CKA
    assert get_scorer("cka", feature_norm="standardize")(x, y).similarity < 0.5


def test_feature_norm_only_for_cka_scorers():
    with pytest.raises(ConfigError, match="--feature-norm"):
        get_scorer("bi", feature_norm="standardize")
    with pytest.raises(ConfigError, match="--feature-norm"):
        get_scorer("cka", feature_norm="whiten")


def test_constant_input_is_not_blown_up_by_standardization():
    constant = torch.ones(32, 8) * torch.randn(1, 8) + torch.randn(32, 8) * 1e-9
    score = get_scorer("cka", feature_norm="standardize")(constant, torch.randn(32, 8))
    assert score.degenerate and score.importance is None


def _reps(blocks: list[tuple[torch.Tensor, torch.Tensor]], pooling="cls", alternates=None) -> BlockRepresentations:
    return BlockRepresentations(blocks=list(range(len(blocks))), inputs=[b[0] for b in blocks], outputs=[b[1] for b in blocks], pooling=pooling, alternates=alternates or {})


def test_degenerate_fallback_rules():
    g = torch.Generator().manual_seed(2)
    constant = torch.ones(16, 8) * torch.randn(1, 8, generator=g)
    varied = [torch.randn(16, 8, generator=g) for _ in range(4)]
    reps = _reps([(constant, varied[0]), (varied[0], varied[1])], alternates={"mean": _reps([(varied[2], varied[3]), (varied[0], varied[1])], pooling="mean")})
    excluded = score_representations(reps, get_scorer("cka"), degenerate_fallback="exclude")
    assert excluded[0].importance is None and excluded[0].fallback == "excluded" and excluded[1].fallback is None
    fallback = score_representations(reps, get_scorer("cka"), degenerate_fallback="mean")
    assert fallback[0].degenerate and fallback[0].fallback == "mean" and "mean pooling" in fallback[0].reason
    assert fallback[0].importance == pytest.approx(get_scorer("cka")(varied[2], varied[3]).importance)
    assert fallback[1] == excluded[1]


def test_degenerate_fallback_end_to_end_on_an_encoder(tiny_bert_dir, data_files):
    """BERT's CLS vector at the embedding output is the same for every sample (the model is built
    that way): excluded by default, scored with mean pooling on request, recorded either way."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    common = dict(model=str(tiny_bert_dir), data=str(data_files.jsonl), num_samples=16, num_layers=3, progress=False)
    default = select_layers(SelectConfig(**common), model=model, tokenizer=tokenizer)
    assert default.layers[0].degenerate and default.layers[0].importance is None and default.layers[0].fallback == "excluded"
    mean = select_layers(SelectConfig(**common, degenerate_fallback="mean"), model=model, tokenizer=tokenizer)
    block0 = mean.layers[0]
    assert block0.degenerate and block0.fallback == "mean" and block0.importance is not None
    assert any("scored with mean pooling" in w for w in mean.warnings)
    assert [r.importance for r in mean.layers[1:]] == [r.importance for r in default.layers[1:]]  # other blocks untouched
    assert mean.to_json()["layers"][0]["fallback"] == "mean"


def test_near_identity_ties_are_reported_with_the_robust_alternative():
    g = torch.Generator().manual_seed(3)
    n, d = 64, 16
    blocks = []
    for i in range(4):
        shared = torch.randn(n, 1, generator=g) * 1000
        x = torch.cat([shared, torch.randn(n, d - 1, generator=g)], dim=1)
        y = torch.cat([shared, x[:, 1:] * (1 - 0.25 * i) + torch.randn(n, d - 1, generator=g) * 0.3 * i], dim=1)
        blocks.append((x, y))
    reps = _reps(blocks)
    scores = score_representations(reps, get_scorer("cka"))
    records = [LayerRecord(index=i, cka=s.similarity, similarity=s.similarity, importance=s.importance, degenerate=False) for i, s in enumerate(scores)]
    assert sum(r.cka >= NEAR_IDENTITY_CKA for r in records) >= 2
    policy = SelectionPolicy(num_layers=2)
    config = SelectConfig(model="m", data="d", num_samples=64)
    from lwlora.selection.policy import select_blocks

    selected, _ = select_blocks([r.importance for r in records], policy)
    diagnostics, warnings = near_identity_diagnostics(reps, records, policy, config, selected)
    assert diagnostics["near_identity_blocks"] and diagnostics["alternative"]["feature_norm"] == "standardize"
    assert diagnostics["alternative"]["selected"] == [2, 3]  # the blocks that really change their input
    assert warnings and "within noise" in warnings[0] and "--feature-norm standardize" in warnings[0]
