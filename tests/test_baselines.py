"""Each unlearning method's defining invariant, on a tiny ViT and a few digits."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from conftest import build_tiny_vit, make_image_splits
from datasets import Dataset
from transformers import get_scheduler

from hf_deepclean.bench.baselines import (
    METHODS,
    RESEED_OFFSET,
    BaselineConfig,
    UnlearningInputs,
    baseline_rate,
    ssd_factors,
    train_from_state,
)
from hf_deepclean.bench.benchmark import BenchmarkArguments
from hf_deepclean.bench.salun_scrub import (
    RandomLabelCollator,
    RandomLabelRows,
    check_classifier,
    distillation_kl,
    forget_loss_gradient,
    saliency_mask,
)
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.data.collators import ClassificationCollator, Columns
from hf_deepclean.distributed import PREPARED_REGISTRIES
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.metrics import compute_sample_outputs
from hf_deepclean.modeling import get_parameters_in_scope
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


def test_retrain_reseeded_is_retrain_with_another_shuffling_seed(inputs):
    reseeded, _ = _run("retrain_reseeded", inputs)
    retrained, _ = _run("retrain", inputs)
    # exactly the original's training on the retain rows, shuffled with the offset seed
    fresh, _ = build_tiny_vit()
    fresh.load_state_dict(inputs.initial_state)
    other = replace(inputs, seed=inputs.seed + RESEED_OFFSET)
    set_seed(other.seed)
    expected = dict(train_from_state(fresh, inputs.retain, other, SCHEDULE).named_parameters())
    assert all(torch.equal(p, expected[name]) for name, p in reseeded.named_parameters())
    # and a different model from `retrain`'s, from the same initial weights
    assert any(not torch.equal(p, dict(retrained.named_parameters())[n]) for n, p in reseeded.named_parameters())


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
    # global: exactly round(0.1 * total) elements (per tensor, each tensor's share is rounded on its own)
    config = DeepCleanConfig(reset_fraction=0.1, repair_epochs=1, selection_scope="global")
    model, before = _run("deepclean", inputs, config=config)
    changed = sum(int((p != before[name]).sum()) for name, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert 0 < changed <= round(0.1 * total)


def test_deepclean_base_reset_puts_back_the_initial_state(inputs):
    """`reset="base"` takes `initial_state` as the base values: without repair, every element is either the trained
    one or exactly the initial one (shifted here, so that no fresh draw can equal it by chance)."""
    shifted = {name: value + 1.0 for name, value in inputs.initial_state.items()}
    config = DeepCleanConfig(reset="base", reset_fraction=0.1, repair_epochs=0, selection_scope="global")
    model, before = _run("deepclean", replace(inputs, initial_state=shifted), config=config)
    changed = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        assert torch.equal(p.detach()[moved], shifted[name][moved]), name
        changed += int(moved.sum())
    assert 0 < changed <= round(0.1 * sum(p.numel() for p in model.parameters()))
    with pytest.raises(DeepCleanError, match="^--reset: got 'base', but no base values to reset to"):
        METHODS["deepclean"](replace(inputs, initial_state=None), config, BaselineConfig())


@pytest.mark.parametrize("pretrained", [False, True])
def test_deepclean_auto_reset_goes_to_the_base_of_pretrained_scenarios_only(inputs, pretrained):
    """`reset="auto"` in the benchmark: toward the initial weights when they are a pretrained model's, fresh values
    when they are a random initialisation, exactly as the explicit modes."""
    scenario = replace(inputs, pretrained=pretrained)
    auto, _ = _run("deepclean", scenario, config=replace(CONFIG, reset="auto", repair_epochs=0))
    explicit, _ = _run(
        "deepclean", scenario, config=replace(CONFIG, reset="base" if pretrained else "init", repair_epochs=0)
    )
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), explicit.state_dict().values()))


def test_deepclean_early_stopping_runs_and_needs_held_out_rows(inputs):
    config = DeepCleanConfig(
        repair_epochs=1, early_stopping=True, early_stopping_criterion="retain_and_mia", early_stopping_tolerance=1.0
    )
    _run("deepclean", inputs, config=config)
    with pytest.raises(DeepCleanError, match="--early_stopping"):
        METHODS["deepclean"](replace(inputs, held_out=None), config, BaselineConfig())


def test_fisher_sums_are_shared_and_charged(inputs):
    shared = replace(inputs, charged_seconds=0.0, _fisher_cache={})
    first = shared.fisher_sums("forget")
    assert shared.charged_seconds == 0.0
    assert shared.fisher_sums("forget") is first and shared.charged_seconds > 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"neggrad_alpha": 1.5}, "--neggrad_alpha: got 1.5; expected a number in [0, 1]."),
        ({"ssd_alpha": 0}, "--ssd_alpha: got 0; expected a finite number > 0."),
        (
            {"fisher_forgetting_alpha": float("inf")},
            "--fisher_forgetting_alpha: got inf; expected a finite number > 0.",
        ),
        ({"salun_mask_share": 0.0}, "--salun_mask_share: got 0.0; expected a number in (0, 1]."),
        ({"salun_mask_share": 1.5}, "--salun_mask_share: got 1.5; expected a number in (0, 1]."),
        ({"scrub_alpha": -0.1}, "--scrub_alpha: got -0.1; expected a finite number >= 0."),
        ({"scrub_gamma": float("nan")}, "--scrub_gamma: got nan; expected a finite number >= 0."),
        (
            {"scrub_alpha": 0, "scrub_gamma": 0},
            "--scrub_gamma: got 0 with --scrub_alpha 0; expected at least one of them > 0.",
        ),
        ({"scrub_temperature": 0}, "--scrub_temperature: got 0; expected a finite number > 0."),
        ({"scrub_max_epochs": 1.5}, "--scrub_max_epochs: got 1.5; expected an integer >= 0."),
        ({"scrub_max_epochs": -1}, "--scrub_max_epochs: got -1; expected an integer >= 0."),
        ({"scrub_max_epochs": True}, "--scrub_max_epochs: got True; expected an integer >= 0."),
    ],
)
def test_baseline_config_validation(kwargs, message):
    with pytest.raises(DeepCleanError) as error:
        BaselineConfig(**kwargs)
    assert str(error.value) == message and "\n" not in message


def test_salun_and_scrub_are_benchmark_methods():
    assert BenchmarkArguments(methods=["salun", "scrub"]).methods == ["salun", "scrub"]


# --------------------------------------------------------------------------------------------------------------
# SalUn
# --------------------------------------------------------------------------------------------------------------


def _brute_force_forget_gradient(model, inputs: UnlearningInputs) -> dict[str, torch.Tensor]:
    """The sum over forget rows of each row's own loss gradient, one row at a time."""
    params = get_parameters_in_scope(model)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for index in range(len(inputs.forget)):
        loss = model(**inputs.collator([inputs.forget[index]])).loss
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if grad is not None:
                total[name] += grad
    return total


def _brute_force_mask(gradients: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    magnitudes = sorted((abs(v) for g in gradients.values() for v in g.flatten().tolist()), reverse=True)
    threshold = magnitudes[math.ceil(share * len(magnitudes)) - 1]
    return {name: (g.abs() >= threshold) & (g != 0) for name, g in gradients.items()}


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_saliency_mask_matches_brute_force(inputs, share):
    model = copy.deepcopy(inputs.model).eval()
    gradients = forget_loss_gradient(
        model, inputs.loader(inputs.forget), inputs.accelerator, get_parameters_in_scope(model)
    )
    brute = _brute_force_forget_gradient(model, inputs)
    for name, grad in gradients.items():
        torch.testing.assert_close(grad, brute[name], rtol=1e-4, atol=1e-7)
    mask, expected = saliency_mask(gradients, share), _brute_force_mask(gradients, share)
    assert all(torch.equal(mask[name], expected[name]) for name in gradients)
    selected, total = sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())
    assert math.ceil(share * total) <= selected <= math.ceil(share * total) + 2  # ties at the threshold are kept
    assert all(p.grad is None for p in model.parameters())  # the gradient pass leaves `.grad` alone


def test_saliency_mask_never_selects_zero_gradients():
    mask = saliency_mask({"w": torch.tensor([0.0, 0.0, 0.0, -2.0]), "b": torch.tensor([1.0, 0.0])}, share=0.5)
    assert mask["w"].tolist() == [False, False, False, True] and mask["b"].tolist() == [True, False]


def test_salun_random_labels_are_wrong_fixed_per_row_and_seeded(inputs):
    classes = inputs.model.config.num_labels
    rows = RandomLabelRows(inputs.forget, inputs.retain, classes, seed=0)
    collator = RandomLabelCollator(inputs.collator, classes)
    forget = [inputs.forget[i] for i in range(len(inputs.forget))]
    true = inputs.collator(forget)["labels"]
    relabelled = collator([rows[i] for i in range(len(inputs.forget))])["labels"]
    assert bool((relabelled != true).all()) and bool(((relabelled >= 0) & (relabelled < classes)).all())
    # the same row gets the same label alone, in another batch, and with the same seed; another seed draws others
    assert [int(collator([rows[i]])["labels"]) for i in range(len(forget))] == relabelled.tolist()
    assert RandomLabelRows(inputs.forget, inputs.retain, classes, seed=0).shifts == rows.shifts
    assert RandomLabelRows(inputs.forget, inputs.retain, classes, seed=1).shifts != rows.shifts
    retain = [rows[len(forget) + i] for i in range(len(inputs.retain))]
    assert torch.equal(collator(retain)["labels"], inputs.collator(retain)["labels"])  # retain rows keep theirs
    many = RandomLabelRows(Dataset.from_dict({"x": [0] * 5000}), inputs.retain, classes, seed=0).shifts
    assert set(many) == set(range(1, classes))  # every wrong label can be drawn, the true one never


def test_salun_trains_only_salient_elements(inputs):
    baselines = BaselineConfig(salun_mask_share=0.3)
    model, before = _run("salun", inputs, baselines=baselines)
    trained = copy.deepcopy(inputs.model)
    mask = saliency_mask(
        forget_loss_gradient(
            trained, inputs.loader(inputs.forget), inputs.accelerator, get_parameters_in_scope(trained)
        ),
        0.3,
    )
    changed = 0
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], before[name][~mask[name]]), name
        changed += int((p.detach() != before[name]).sum())
    assert 0 < changed <= sum(int(m.sum()) for m in mask.values())
    again, _ = _run("salun", inputs, baselines=baselines)  # deterministic given the seed
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------------------
# SCRUB
# --------------------------------------------------------------------------------------------------------------


def test_distillation_kl_on_known_values():
    teacher, student = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # (1/4, 3/4) and (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_kl(student, teacher, 1.0).item() == pytest.approx(expected)
    # at temperature T: the KL of the logits divided by T, times T^2; rows are averaged
    assert distillation_kl(student.repeat(3, 1), 2 * teacher.repeat(3, 1), 2.0).item() == pytest.approx(4 * expected)
    with pytest.raises(DeepCleanError, match=r"^scrub: needs a classifier .*logits of shape \(2, 3, 4\)"):
        check_classifier("scrub", torch.zeros(2, 3, 4))


def _reference_scrub(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig):
    """SCRUB written out step by step in plain PyTorch: per epoch, max-steps on forget rows (first epochs), then
    min-steps on retain rows; one AdamW and one linear schedule over all steps. (The KL is `distillation_kl`, checked
    on known values above: at the first max-step the student is the teacher, the KL's gradient is zero up to rounding
    and AdamW's normalised step turns that rounding into full-size steps, so the same rounding is needed here.)"""
    student, teacher = copy.deepcopy(inputs.model), inputs.model
    forget, retain = inputs.loader(inputs.forget, shuffle=True), inputs.loader(inputs.retain, shuffle=True)
    epochs = math.ceil(config.repair_epochs)
    total = epochs * len(retain) + min(baselines.scrub_max_epochs, epochs) * len(forget)
    optimizer = torch.optim.AdamW(student.parameters(), lr=baseline_rate(inputs, baselines), weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=total)

    def kl(batch):
        with torch.no_grad():
            teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        outputs = student(**batch)
        divergence = distillation_kl(outputs.logits, teacher_logits, baselines.scrub_temperature)
        return divergence, outputs.loss

    student.train()
    for epoch in range(epochs):
        batches = [(b, -1) for b in forget] if epoch < baselines.scrub_max_epochs else []
        for batch, sign in batches + [(b, 1) for b in retain]:
            divergence, ce = kl(batch)
            loss = -divergence if sign < 0 else baselines.scrub_gamma * ce + baselines.scrub_alpha * divergence
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return student.eval()


def test_scrub_matches_a_step_by_step_reference(inputs):
    config = DeepCleanConfig(repair_epochs=2)
    baselines = BaselineConfig(scrub_max_epochs=1, scrub_alpha=0.5, scrub_gamma=0.5, scrub_temperature=2.0)
    model, _ = _run("scrub", inputs, config=config, baselines=baselines)
    expected = dict(_reference_scrub(inputs, config, baselines).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-4, atol=1e-6)
        assert not torch.equal(p, inputs.model.get_parameter(name))


def test_baselines_train_at_the_rate_the_model_was_trained_at(inputs):
    """A pretrained encoder fine-tuned at 5e-5 is destroyed by a fine-tune at 1e-3: the baselines take the
    scenario's own rate unless `--baseline_learning_rate` says otherwise."""
    assert baseline_rate(replace(inputs, training=TrainingSchedule(3, 5e-5)), BaselineConfig()) == 5e-5
    assert baseline_rate(replace(inputs, training=None), BaselineConfig()) == 1e-3
    assert baseline_rate(inputs, BaselineConfig(baseline_learning_rate=2e-4)) == 2e-4
