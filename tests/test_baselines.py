"""Each unlearning method's defining invariant, on a tiny ViT and a few digits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_vit, make_image_splits

from hf_deepclean.bench.baselines import METHODS, BaselineConfig, UnlearningInputs, ssd_factors, train_from_state
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.data.collators import ClassificationCollator, Columns
from hf_deepclean.distributed import PREPARED_REGISTRIES
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.metrics import compute_sample_outputs
from hf_deepclean.unlearning.training import TrainingSchedule


SCHEDULE = TrainingSchedule(epochs=3, learning_rate=3e-3)
CONFIG = DeepCleanConfig(repair_epochs=1, per_device_batch_size=8)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def inputs() -> UnlearningInputs:
    """A tiny ViT trained on 48 digits; forget 8 of them."""
    splits = make_image_splits(n_train=48, n_test=16)
    model, processor = build_tiny_vit()
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)
    collator = ClassificationCollator(processor, Columns(label="label", image="image"), label_map=None)
    train = splits["train"]
    bootstrap = UnlearningInputs(model, train, train, collator, accelerator, batch_size=8)
    trained = train_from_state(model, train, bootstrap, SCHEDULE)
    return UnlearningInputs(
        trained,
        train.select(range(8)),
        train.select(range(8, 48)),
        collator,
        accelerator,
        batch_size=8,
        held_out=splits["test"],
        initial_state=initial_state,
        training=SCHEDULE,
    )


def _run(name: str, inputs: UnlearningInputs, config=CONFIG, baselines=None):
    before = _state(inputs.model)
    model = METHODS[name](inputs, config, baselines or BaselineConfig())
    after = _state(inputs.model)
    assert all(torch.equal(before[k], after[k]) for k in before), f"{name} modified the trained model"
    assert model is not inputs.model
    assert {k: v.shape for k, v in _state(model).items()} == {k: v.shape for k, v in before.items()}
    return model, before


def test_original_is_an_identical_copy(inputs):
    model, before = _run("original", inputs)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_retrain_starts_from_the_same_initialisation(inputs):
    no_training = TrainingSchedule(epochs=0, learning_rate=1e-3)
    zero = replace(inputs, training=no_training)
    model, _ = _run("retrain", zero)
    assert all(torch.equal(p, inputs.initial_state[name]) for name, p in model.named_parameters())
    # and with the schedule, it is exactly the original's training applied to the retain rows
    retrained, _ = _run("retrain", inputs)
    fresh, _ = build_tiny_vit()
    fresh.load_state_dict(inputs.initial_state)
    expected = train_from_state(fresh, inputs.retain, inputs, SCHEDULE)
    assert all(torch.equal(p, dict(expected.named_parameters())[n]) for n, p in retrained.named_parameters())


def test_retrain_needs_the_initialisation(inputs):
    with pytest.raises(DeepCleanError, match="retrain"):
        METHODS["retrain"](replace(inputs, initial_state=None), CONFIG, BaselineConfig())


def test_finetune_moves_every_tensor_and_keeps_the_architecture(inputs):
    model, before = _run("finetune", inputs)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_neggrad_plus_without_ascent_is_finetune(inputs):
    finetuned, _ = _run("finetune", inputs)
    registered = {name: list(getattr(inputs.accelerator, name)) for name in PREPARED_REGISTRIES}
    descent_only, _ = _run("neggrad_plus", inputs, baselines=BaselineConfig(neggrad_alpha=1.0))
    # its model copy, optimizer and loaders are not kept by the benchmark's long-lived Accelerator
    assert {name: list(getattr(inputs.accelerator, name)) for name in PREPARED_REGISTRIES} == registered
    for name, p in descent_only.named_parameters():
        torch.testing.assert_close(p, dict(finetuned.named_parameters())[name], rtol=1e-5, atol=1e-6)
    # with ascent, the forget rows end up with a higher loss than under plain descent
    ascended, _ = _run("neggrad_plus", inputs, baselines=BaselineConfig(neggrad_alpha=0.5))
    forget = inputs.loader(inputs.forget)
    loss_ascended = compute_sample_outputs(ascended, forget, inputs.accelerator)["loss"].mean()
    loss_descent = compute_sample_outputs(descent_only, forget, inputs.accelerator)["loss"].mean()
    assert loss_ascended > loss_descent


def test_ssd_factors_on_known_values():
    forget = {"w": torch.tensor([10.0, 10.0, 1.0, 0.0])}
    full = {"w": torch.tensor([0.5, 2.0, 1.0, 0.0])}
    factors = ssd_factors(forget, full, alpha=10.0, lam=1.0)["w"]
    # only the first element has forget > 10 x full; it is dampened by full / forget = 0.05
    assert factors.tolist() == pytest.approx([0.05, 1.0, 1.0, 1.0])
    assert ssd_factors(forget, full, alpha=2.0, lam=100.0)["w"].tolist() == [1.0, 1.0, 1.0, 1.0]  # capped at 1


def test_ssd_leaves_unselected_elements_exactly_unchanged(inputs):
    # alpha=2 (not the default 10): with a forget share of 1/6, forget > 10 x full is impossible (see docs/benchmark.md)
    model, before = _run("ssd", inputs, baselines=BaselineConfig(ssd_alpha=2.0))
    forget = inputs.fisher("forget")
    retain_sums, retain_count = inputs.fisher_sums("retain")
    forget_sums, forget_count = inputs.fisher_sums("forget")
    full = {n: (forget_sums[n] + retain_sums[n]) / (forget_count + retain_count) for n in forget_sums}
    changed = 0
    for name, p in model.named_parameters():
        selected = forget[name] > 2.0 * full[name]
        assert torch.equal(p[~selected], before[name][~selected])
        # selected elements shrink towards zero, never grow or flip sign
        assert bool((p[selected].abs() <= before[name][selected].abs()).all())
        assert bool((p[selected] * before[name][selected] >= 0).all())
        changed += int((p != before[name]).sum())
    assert changed > 0


def test_ssd_default_alpha_selects_nothing_when_the_forget_share_is_large(inputs):
    model, before = _run("ssd", inputs)  # forget is 1/6 of the data: forget > 10 x full cannot hold
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_fisher_forgetting_noise_scales_with_sqrt_alpha(inputs):
    small, before = _run("fisher_forgetting", inputs, baselines=BaselineConfig(fisher_forgetting_alpha=1e-8))
    large, _ = _run("fisher_forgetting", inputs, baselines=BaselineConfig(fisher_forgetting_alpha=4e-8))
    for name, p in small.named_parameters():
        delta_small, delta_large = p - before[name], dict(large.named_parameters())[name] - before[name]
        torch.testing.assert_close(delta_large, 2 * delta_small, rtol=1e-3, atol=1e-6)
    # elements the retain rows care about more get less noise: variance alpha / F
    retain = inputs.fisher("retain")
    name = "classifier.weight"
    noise = (dict(small.named_parameters())[name] - before[name]).abs()
    high, low = retain[name] > retain[name].median(), retain[name] <= retain[name].median()
    assert noise[high].mean() < noise[low].mean()


def test_deepclean_changes_at_most_the_reset_share(inputs):
    model, before = _run("deepclean", inputs, config=DeepCleanConfig(reset_fraction=0.1, repair_epochs=1))
    changed = sum(int((p != before[name]).sum()) for name, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert 0 < changed <= round(0.1 * total)


def test_deepclean_base_reset_puts_back_the_initial_state(inputs):
    """`reset="base"` takes `initial_state` as the base values: without repair, every element is either the trained
    one or exactly the initial one (shifted here, so that no fresh draw can equal it by chance)."""
    shifted = {name: value + 1.0 for name, value in inputs.initial_state.items()}
    config = DeepCleanConfig(reset="base", reset_fraction=0.1, repair_epochs=0)
    model, before = _run("deepclean", replace(inputs, initial_state=shifted), config=config)
    changed = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        assert torch.equal(p.detach()[moved], shifted[name][moved]), name
        changed += int(moved.sum())
    assert 0 < changed <= round(0.1 * sum(p.numel() for p in model.parameters()))
    with pytest.raises(DeepCleanError, match="^--reset: got 'base', but no base values to reset to"):
        METHODS["deepclean"](replace(inputs, initial_state=None), config, BaselineConfig())


def test_deepclean_early_stopping_runs_and_needs_held_out_rows(inputs):
    config = DeepCleanConfig(repair_epochs=1, early_stopping=True, early_stopping_tolerance=1.0)
    _run("deepclean", inputs, config=config)
    with pytest.raises(DeepCleanError, match="--early_stopping"):
        METHODS["deepclean"](replace(inputs, held_out=None), config, BaselineConfig())


def test_fisher_sums_are_shared_and_charged(inputs):
    shared = replace(inputs, charged_seconds=0.0, _fisher_cache={})
    first = shared.fisher_sums("forget")
    assert shared.charged_seconds == 0.0
    assert shared.fisher_sums("forget") is first and shared.charged_seconds > 0.0


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"neggrad_alpha": 1.5}, "--neggrad_alpha"),
        ({"ssd_alpha": 0}, "--ssd_alpha"),
        ({"fisher_forgetting_alpha": float("inf")}, "--fisher_forgetting_alpha"),
    ],
)
def test_baseline_config_validation(kwargs, flag):
    with pytest.raises(DeepCleanError, match=flag):
        BaselineConfig(**kwargs)
