"""DeepClean's exploratory options wired through `run_deepclean` (the pipeline the CLI and the benchmark share):
movement-weighted selection and the forget-ascent repair keep every unselected element bit-for-bit."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hf_deepclean.bench.benchmark import train_original
from hf_deepclean.bench.scenarios import build_digits_scenario
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.pipeline.deepclean import UnlearningRows, run_deepclean


SEED = 5


@pytest.fixture(scope="module")
def trained():
    scenario = build_digits_scenario("digits_random", SEED, epochs=2, max_rows=200)
    inputs = train_original(scenario, Accelerator(cpu=True), SEED)
    return inputs


def clean(inputs, config: DeepCleanConfig, base_values=None):
    model = inputs.copy_model()
    rows = UnlearningRows(inputs.forget, inputs.retain, None, inputs.collator, batch_size=16, seed=SEED)
    set_seed(SEED)
    outcome = run_deepclean(model, rows, config, inputs.accelerator, base_values=base_values)
    return model, outcome


def assert_only_selected_changed(model, original, masks):
    params = dict(model.named_parameters())
    for name, value in original.named_parameters():
        mask = masks.get(name, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(params[name].detach()[~mask], value.detach()[~mask]), name


def test_movement_weighting_needs_the_start_values(trained):
    config = DeepCleanConfig(selection_weighting="movement", repair_epochs=0.25, learning_rate=1e-3)
    with pytest.raises(DeepCleanError, match="^--selection_weighting/--min_movement_quantile: "):
        clean(trained, config)
    with pytest.raises(DeepCleanError, match="^--selection_weighting/--min_movement_quantile: "):
        clean(trained, DeepCleanConfig(min_movement_quantile=0.5, repair_epochs=0))


def test_movement_weighting_never_selects_elements_that_did_not_move(trained):
    trained_values = {name: value.detach().clone() for name, value in trained.model.named_parameters()}
    start = {name: value.clone() for name, value in trained.initial_state.items()}
    still = "vit.layers.0.attention.q_proj.weight"
    start[still] = trained_values[still].clone()  # this tensor did not move in training
    config = DeepCleanConfig(
        selection_weighting="movement",
        selection_scope="global",  # the share comes from the moved tensors (per tensor, the still one gives none)
        reset="base",
        repair_epochs=0.5,
        learning_rate=1e-3,
        early_stopping=False,
    )
    model, outcome = clean(trained, config, base_values=start)
    assert not bool(outcome.masks[still].any())
    assert outcome.reset.statistics.total.share == pytest.approx(0.5, abs=1e-3)
    assert_only_selected_changed(model, trained.model, outcome.masks)
    plain_model, plain = clean(trained, DeepCleanConfig(reset="base", repair_epochs=0, learning_rate=1e-3), start)
    assert plain.reset.selection_sha256 != outcome.reset.selection_sha256


def test_forget_ascent_repair_changes_only_selected_elements(trained):
    settings = {"repair_epochs": 1, "learning_rate": 1e-3, "weight_decay": 0.1}
    models = {}
    for forget_loss in ("ascent", "simnpo"):
        config = DeepCleanConfig(forget_ascent_weight=0.5, forget_loss=forget_loss, **settings)
        models[forget_loss], outcome = clean(trained, config)
        assert outcome.repair.steps > 0
        assert_only_selected_changed(models[forget_loss], trained.model, outcome.masks)
    models["plain"], _ = clean(trained, DeepCleanConfig(**settings))
    for first, second in (("ascent", "plain"), ("simnpo", "plain"), ("ascent", "simnpo")):
        pairs = zip(models[first].parameters(), models[second].parameters(), strict=True)
        assert any(not torch.equal(a, b) for a, b in pairs), (first, second)


@pytest.mark.parametrize(
    ("flags", "argument"),
    [
        ({"selection_scope": "per_layer"}, "--selection_scope/--forget_ascent_weight"),
        ({"forget_ascent_weight": 0.1}, "--selection_scope/--forget_ascent_weight"),
        ({"selection_weighting": "movement"}, "--selection_weighting/--min_movement_quantile"),
    ],
)
def test_options_without_an_fsdp_path_are_refused_under_fsdp(trained, monkeypatch, flags, argument):
    import hf_deepclean.pipeline.deepclean as pipeline

    monkeypatch.setattr(pipeline, "any_sharded", lambda params: True)  # as if the parameters were FSDP-sharded
    with pytest.raises(DeepCleanError, match=f"^{argument}: .* not available under FSDP"):
        clean(trained, DeepCleanConfig(**flags, repair_epochs=0))


@pytest.fixture(scope="module")
def well_trained():
    """A model that fits its rows, so that the reset does damage that probe trials can tell rates apart by."""
    return train_original(
        build_digits_scenario("digits_random", SEED, epochs=15, max_rows=200), Accelerator(cpu=True), SEED
    )


def test_the_repair_continues_from_the_probes_trial_within_its_budget(well_trained, monkeypatch):
    """With `KEEP_CHOSEN_TRIAL`, the repair goes on from the chosen rate's trial: the trial's steps count against the
    budget (steps in all = the budget's, without early stopping), and unselected elements stay bit-for-bit the
    original's. By default the repair starts over from the reset weights, at the same rate and selection."""
    from hf_deepclean.unlearning import probe as probe_module

    assert probe_module.KEEP_CHOSEN_TRIAL is False
    monkeypatch.setattr(probe_module, "PROBE_MIN_DAMAGE", -math.inf)  # trials however little this reset did
    monkeypatch.setattr(probe_module, "KEEP_CHOSEN_TRIAL", True)
    config = DeepCleanConfig(repair_epochs=2, early_stopping=False)
    model, outcome = clean(well_trained, config)
    budget = 2 * -(-len(well_trained.retain) // 16)  # 2 epochs of batches of 16
    repair = outcome.repair
    assert repair.learning_rate_probe_kept_steps == repair.learning_rate_probe_steps == 10
    assert repair.steps == budget
    assert_only_selected_changed(model, well_trained.model, outcome.masks)
    monkeypatch.setattr(probe_module, "KEEP_CHOSEN_TRIAL", False)
    restarted_model, restarted = clean(well_trained, config)
    assert restarted.repair.learning_rate_probe_kept_steps == 0 and restarted.repair.steps == budget
    assert restarted.repair.learning_rate == repair.learning_rate
    assert restarted.reset.selection_sha256 == outcome.reset.selection_sha256
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), restarted_model.parameters(), strict=True))
