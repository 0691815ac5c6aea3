"""The selection variants of DeepClean: weighting by movement, movement floors, per-layer thresholds; and the options'
one-line refusals (docs/method.md, "Selection")."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import PartialState

from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.unlearning.selection import layer_of, select_weights_to_reset, weigh_by_movement


SHAPES = {
    "encoder.layer.0.attention.weight": (3, 4),
    "encoder.layer.0.attention.bias": (3,),
    "encoder.layer.1.attention.weight": (3, 4),
    "encoder.layer.1.output.bias": (5,),
    "embeddings.word.weight": (6, 2),
    "classifier.weight": (2, 3),
}


@pytest.fixture(autouse=True)
def accelerate_state():
    PartialState(cpu=True)


def tensors(seed: int, offset: float = 0.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) + offset for name, shape in SHAPES.items()}


def brute_force_scores(ratios, current, start, weighting, quantile):
    """Element by element, in plain Python: `ratio * |θ - θ_start|` (or the ratio), 0 below the tensor's quantile."""
    scores = {}
    for name, ratio in ratios.items():
        values, ratio_values = current[name].reshape(-1).tolist(), ratio.reshape(-1).tolist()
        origin = start[name].reshape(-1).tolist() if name in start else [0.0] * len(values)
        movements = [abs(v - o) for v, o in zip(values, origin, strict=True)]
        ranked = sorted(movements)
        floor = ranked[max(1, math.ceil(quantile * len(ranked))) - 1] if quantile > 0 else -math.inf
        out = []
        for r, m in zip(ratio_values, movements, strict=True):
            score = r * m if weighting == "movement" else r
            out.append(score if m >= floor else 0.0)
        scores[name] = torch.tensor(out).view(ratio.shape)
    return scores


@pytest.mark.parametrize(("weighting", "quantile"), [("movement", 0.0), ("none", 0.5), ("movement", 0.25)])
def test_weigh_by_movement_matches_brute_force(weighting, quantile):
    ratios = {name: value.abs() for name, value in tensors(0).items()}
    current, start = tensors(1), tensors(2)
    del start["classifier.weight"]  # a new head: counted as moved from zero
    start["embeddings.word.weight"] = torch.zeros(2, 6)  # another shape: from zero too
    scores = weigh_by_movement(ratios, current, start, weighting=weighting, min_movement_quantile=quantile)
    expected = brute_force_scores(
        ratios, current, {k: v for k, v in start.items() if k != "embeddings.word.weight"}, weighting, quantile
    )
    assert set(scores) == set(ratios)
    for name in ratios:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-6, atol=0)
    if quantile:  # the floor zeroes about that share of every tensor
        for score in scores.values():
            assert int((score == 0).sum()) == max(1, math.ceil(quantile * score.numel())) - 1
    # the inputs are untouched
    assert all(torch.equal(ratios[name], tensors(0)[name].abs()) for name in ratios)


def test_unmoved_elements_are_never_selected():
    ratios = {name: value.abs() + 0.1 for name, value in tensors(0).items()}
    current = tensors(1)
    start = {name: value.clone() for name, value in current.items()}
    start["encoder.layer.1.attention.weight"] += 1.0  # only this tensor moved
    scores = weigh_by_movement(ratios, current, start)
    masks = select_weights_to_reset(scores, reset_fraction=0.5)
    assert bool(masks["encoder.layer.1.attention.weight"].all())
    assert not any(bool(mask.any()) for name, mask in masks.items() if name != "encoder.layer.1.attention.weight")


def test_layer_of():
    assert layer_of("encoder.layer.0.attention.weight") == "encoder.layer.0"
    assert layer_of("bert.encoder.layer.11.output.dense.bias") == "bert.encoder.layer.11"
    assert layer_of("embeddings.word.weight") == "embeddings.word"
    assert layer_of("classifier.weight") == "classifier"
    assert layer_of("bias") == "bias"


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_per_layer_selection_matches_brute_force(fraction):
    ratios = {name: value.abs() for name, value in tensors(3).items()}
    masks = select_weights_to_reset(ratios, reset_fraction=fraction, selection_scope="per_layer")
    layers = {}
    for name in ratios:
        layers.setdefault(layer_of(name), []).append(name)
    assert len(layers) == 4  # two blocks of two tensors each, the embedding, the head
    for names in layers.values():
        values = [(float(v), name, i) for name in names for i, v in enumerate(ratios[name].reshape(-1).tolist())]
        top = set(sorted(values, reverse=True)[: round(fraction * len(values))])
        for name in names:
            expected = [(float(v), name, i) in top for i, v in enumerate(ratios[name].reshape(-1).tolist())]
            assert masks[name].reshape(-1).tolist() == expected, name
    # a layer holding two tensors takes its share from the pair, not from each: unlike per_parameter
    per_parameter = select_weights_to_reset(ratios, reset_fraction=fraction, selection_scope="per_parameter")
    assert any(not torch.equal(masks[name], per_parameter[name]) for name in ratios)


def test_per_parameter_selection_is_unchanged_by_the_grouping():
    ratios = {name: value.abs() for name, value in tensors(4).items()}
    masks = select_weights_to_reset(ratios, reset_fraction=0.3, selection_scope="per_parameter")
    for name, ratio in ratios.items():
        values = ratio.reshape(-1)
        k = round(0.3 * values.numel())
        assert masks[name].reshape(-1).tolist() == [
            bool(v >= values.sort(descending=True).values[k - 1]) for v in values
        ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("selection_weighting", "moved"),
        ("min_movement_quantile", 1.0),
        ("min_movement_quantile", -0.1),
        ("min_movement_quantile", "half"),
        ("forget_ascent_weight", -0.1),
        ("forget_ascent_weight", math.nan),
        ("selection_scope", "per_block"),
        ("base_reset_learning_rate", 0.0),
        ("base_reset_learning_rate", math.inf),
    ],
)
def test_bad_option_values_are_refused_in_one_line(field, value):
    with pytest.raises(DeepCleanError, match=f"^--{field}: got ") as error:
        DeepCleanConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_weigh_by_movement_refuses_bad_values():
    ratios = {name: value.abs() for name, value in tensors(0).items()}
    with pytest.raises(DeepCleanError, match="^--selection_weighting: got 'moved'"):
        weigh_by_movement(ratios, tensors(1), tensors(2), weighting="moved")
    with pytest.raises(DeepCleanError, match="^--min_movement_quantile: got 1"):
        weigh_by_movement(ratios, tensors(1), tensors(2), min_movement_quantile=1)
