"""The repair's learning-rate probe (`probe_learning_rate`)."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from hf_deepclean.unlearning.probe import mean_loss, probe_learning_rate
from hf_deepclean.unlearning.training import train_model


class Regressor(nn.Module):
    """A linear model with a BatchNorm and dropout, returning `.loss` like a transformers model."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x, labels):
        prediction = self.linear(self.dropout(self.norm(x))).squeeze(-1)
        return type("Output", (), {"loss": ((prediction - labels) ** 2).mean()})()


def rows(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=generator)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(rows(64, 1), batch_size=8, shuffle=True, generator=generator)
    return train, DataLoader(rows(32, 2), batch_size=8)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def trial_model(rate: float, steps: int, masks=None) -> nn.Module:
    """Brute force: one trial from a fresh copy of the same model, data order and random state."""
    torch.manual_seed(0)
    model = Regressor()
    train, _ = loaders()
    torch.manual_seed(99)
    train_model(
        model,
        train,
        Accelerator(cpu=True),
        epochs=steps / len(train),
        learning_rate=rate,
        lr_scheduler_type="constant",
        masks=masks,
    )
    return model


def trial_loss(rate: float, steps: int, masks=None) -> float:
    return mean_loss(trial_model(rate, steps, masks), loaders()[1], Accelerator(cpu=True))


def probe_fresh_regressor(**kwargs):
    """The probe over four rates of 6-step trials on a fresh seeded Regressor: `(model, its weights before, probe)`."""
    torch.manual_seed(0)
    model = Regressor()
    before = state(model)
    train, evaluation = loaders()
    torch.manual_seed(99)
    found = probe_learning_rate(
        model, train, evaluation, Accelerator(cpu=True), candidates=(1e-1, 1e-2, 1e-3, 1e-4), steps=6, **kwargs
    )
    return model, before, found


@pytest.mark.parametrize("masked", [False, True])
def test_probe_matches_separate_trials_and_restores_the_model(masked):
    torch.manual_seed(0)
    model = Regressor()
    masks = {"linear.weight": torch.tensor([[True, False, True, False]])} if masked else None
    before = state(model)
    train, evaluation = loaders()
    candidates = (1e-1, 1e-2, 1e-3, 1e-4)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    probe = probe_learning_rate(
        model, train, evaluation, Accelerator(cpu=True), candidates=candidates, steps=6, masks=masks
    )
    rate, losses = probe.rate, probe.losses
    assert probe.separated and probe.steps == 6
    # weights, BatchNorm statistics and the global random state are as they were
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    # largest first, each trial from the same start with the same batches and dropout draws
    assert list(losses) == sorted(losses, reverse=True)
    for tried, loss in losses.items():
        assert loss == pytest.approx(trial_loss(tried, 6, masks), rel=1e-6, abs=0)
    # each rate tried but the last was within 2% of the lowest loss before it; the choice is the last of those
    values = list(losses.values())
    within = [loss <= min(values[:i], default=math.inf) * 1.02 for i, loss in enumerate(values)]
    assert all(within[1:-1])
    assert rate == list(losses)[-1 if within[-1] else -2]
    if len(values) < len(candidates):
        assert not within[-1]


def test_probe_ties_go_to_the_smaller_rate():
    train, evaluation = loaders()
    candidates = (1e-1, 1e-2, 1e-3, 1e-4)

    def probe(tolerance):
        torch.manual_seed(0)
        probe = probe_learning_rate(
            Regressor(), train, evaluation, Accelerator(cpu=True), candidates=candidates, steps=6, tolerance=tolerance
        )
        return probe.rate, probe.losses

    # everything is a tie: every rate is tried and the smallest wins
    rate, losses = probe(1e9)
    assert list(losses) == list(candidates) and rate == 1e-4
    # no tolerance: the lowest loss wins, and the sweep ends at the first rate that is worse
    rate, losses = probe(0.0)
    assert rate == min(losses, key=losses.get) == 1e-1
    assert list(losses) == [1e-1, 1e-2] and losses[1e-2] > losses[1e-1]


def test_probe_prefers_a_small_rate_when_large_ones_diverge():
    torch.manual_seed(0)
    model = Regressor()
    train, evaluation = loaders()
    probe = probe_learning_rate(
        model, train, evaluation, Accelerator(cpu=True), candidates=(1e6, 1e3, 1e-1), steps=8, max_grad_norm=0
    )
    rate, losses = probe.rate, probe.losses
    assert rate == 1e-1
    assert losses[1e-1] < losses[1e3]


class SlowStart(nn.Module):
    """Logistic regression from zero weights on a feature of small scale: every rate leaves the chance loss (ln 2)
    only slowly, as a heavily reset model does, so short trials of all the candidates tie at chance."""

    def __init__(self, scale: float):
        super().__init__()
        self.linear = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.scale = scale

    def forward(self, x, labels):
        logits = self.linear(x * self.scale).squeeze(-1)
        return type("Output", (), {"loss": nn.functional.binary_cross_entropy_with_logits(logits, labels)})()


def sign_rows(n: int, seed: int) -> list[dict]:
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))
    return [{"x": x[i], "labels": (x[i, 0] > 0).float()} for i in range(n)]


def slow_start_probe(scale: float, max_steps: int | None):
    train = DataLoader(sign_rows(64, 1), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    evaluation = DataLoader(sign_rows(64, 2), batch_size=16)
    candidates = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
    return probe_learning_rate(
        SlowStart(scale), train, evaluation, Accelerator(cpu=True), candidates=candidates, max_steps=max_steps
    )


def test_probe_whose_trials_tie_at_chance_does_not_pick_the_smallest_rate():
    """Every trial of 10 steps ends within 2% of ln 2: the tie rule alone would choose 3e-5, which cannot repair.
    Without room for longer trials the probe takes the largest rate that did no harm."""
    probe = slow_start_probe(0.3, max_steps=None)
    assert probe.start_loss == pytest.approx(math.log(2), rel=1e-6)
    assert max(probe.losses.values()) <= min(probe.losses.values()) * 1.02  # a tie, all at chance
    assert all(loss > probe.start_loss * 0.95 for loss in probe.losses.values())
    assert not probe.separated and probe.steps == 10 and probe.rate == 3e-3


def test_probe_repeats_a_sweep_that_cannot_tell_rates_apart_with_more_steps():
    probe = slow_start_probe(0.3, max_steps=200)
    # 10 and 40 steps left every rate at chance; 160 steps separate them, and the largest rate wins outright
    assert probe.separated and probe.steps == 160 and probe.rate == 3e-3
    assert probe.losses[3e-3] <= probe.start_loss * 0.95
    assert list(probe.losses) == [3e-3, 1e-3] and probe.losses[1e-3] > probe.losses[3e-3] * 1.02


def test_probe_after_a_light_reset_measures_progress_and_ties_against_the_damage():
    """A reset that raised the loss 6% above the original's: the first sweep's best trial won back more than a quarter
    of that damage, though not 5% of the loss, so it separates the rates, and the rate that won back five times more
    than 1e-3 is no tie with it. Without the original's loss the same choice takes 40-step trials."""
    train = DataLoader(sign_rows(64, 1), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    evaluation = DataLoader(sign_rows(64, 2), batch_size=16)
    candidates = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)

    def probe(reference_loss):
        return probe_learning_rate(
            SlowStart(1.0),
            train,
            evaluation,
            Accelerator(cpu=True),
            candidates=candidates,
            max_steps=200,
            reference_loss=reference_loss,
        )

    plain = probe(None)
    assert plain.separated and plain.steps == 40 and plain.rate == 3e-3
    reference = math.log(2) / 1.06
    light = probe(reference)
    damage = light.start_loss - reference
    assert light.separated and light.steps == 10 and light.rate == 3e-3 and list(light.losses) == [3e-3, 1e-3]
    best, next_rate = light.losses[3e-3], light.losses[1e-3]
    assert light.start_loss - best >= 0.25 * damage and best > light.start_loss * 0.95  # progress: damage rule only
    assert next_rate - best > 0.10 * damage and next_rate <= best * 1.02  # a tie by the loss rule alone


def test_mean_loss_is_row_weighted_and_inf_when_not_finite():
    model = Regressor().eval()
    evaluation = DataLoader(rows(10, 3), batch_size=4)  # batches of 4, 4 and 2 rows
    with torch.no_grad():
        expected = sum(float((model(b["x"], b["labels"]).loss) * len(b["labels"])) for b in evaluation) / 10
    assert mean_loss(model, evaluation, Accelerator(cpu=True)) == pytest.approx(expected, rel=1e-9)
    with torch.no_grad():
        model.linear.bias.fill_(math.inf)
    assert mean_loss(model, evaluation, Accelerator(cpu=True)) == math.inf


def test_probe_needs_candidates():
    train, evaluation = loaders()
    with pytest.raises(ValueError):
        probe_learning_rate(Regressor(), train, evaluation, Accelerator(cpu=True), candidates=())


def test_training_frees_what_it_prepared_without_a_garbage_collection(monkeypatch):
    """After `train_model` the Accelerator holds nothing the training prepared (its optimizer, scheduler and loader,
    nor the loaders that evaluations during it prepared), keeps what its caller had prepared, and the optimizer
    (with its state, two copies of the trained weights) is freed by reference counting alone: the probe runs one
    training per candidate rate, and `Accelerator.free_memory`'s full `gc.collect()` cost more than a trial of a small
    model."""
    import gc
    import weakref

    optimizers = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self))

    def no_collection(*args, **kwargs):
        raise AssertionError("gc.collect() called")

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    torch.manual_seed(0)
    model, (train, evaluation) = Regressor(), loaders()
    accelerator = Accelerator(cpu=True)
    prepared_before = accelerator.prepare(DataLoader(rows(8, 3), batch_size=4))  # what the caller prepared stays
    losses = []

    def evaluate_during_training(step: int) -> bool:  # as the early-stopping monitor does
        losses.append(mean_loss(model, evaluation, accelerator))
        return False

    monkeypatch.setattr(gc, "collect", no_collection)
    gc.disable()
    try:
        for _ in range(2):
            train_model(model, train, accelerator, epochs=1, learning_rate=1e-2, should_stop=evaluate_during_training)
        assert len(optimizers) == 2 and all(ref() is None for ref in optimizers)
    finally:
        gc.enable()
    assert len(losses) == 2 * (len(train) - 1)
    assert accelerator._optimizers == [] and accelerator._schedulers == [] and accelerator._models == []
    assert accelerator._dataloaders == [prepared_before]


def test_release_training_frees_the_moments_of_an_optimizer_kept_alive_by_a_gradient_scaler():
    """With fp16 on a GPU, Accelerate's optimizer wrapper refers to itself through its gradient scaler, so dropping
    the references leaves it (and AdamW's moments) to the next garbage collection. `release_training` frees the
    moments at once. Built on the CPU with a CPU scaler, which Accelerate wraps the same way."""
    import gc
    import weakref

    from accelerate.optimizer import AcceleratedOptimizer

    from hf_deepclean.unlearning.training import release_training

    accelerator = Accelerator(cpu=True)
    model = nn.Linear(4, 2)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters()), scaler=torch.amp.GradScaler("cpu"))
    optimizer.scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    optimizer.step()
    moments = [weakref.ref(tensor) for state in optimizer.state.values() for tensor in state.values()]
    assert moments and all(ref() is not None for ref in moments)
    wrapper = weakref.ref(optimizer)
    gc.disable()
    try:
        release_training(accelerator, optimizer)
        del optimizer
        assert wrapper() is not None  # the reference cycle: only a garbage collection would free it
        assert all(ref() is None for ref in moments)  # but the moments are gone already
    finally:
        gc.enable()


def ascent_training(weight: float, ascent: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A masked training of the Regressor with (or without) forget ascent on other rows; returns the model and
    its weights before training."""
    torch.manual_seed(0)
    model = Regressor()
    before = state(model)
    train, _ = loaders()
    forget = DataLoader(rows(20, 7), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    masks = {"linear.weight": torch.tensor([[True, False, True, False]])}
    torch.manual_seed(99)
    train_model(
        model,
        train,
        Accelerator(cpu=True),
        epochs=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        masks=masks,
        ascent_dataloader=forget if ascent else None,
        ascent_weight=weight,
    )
    return model, before


def test_forget_ascent_moves_only_selected_elements_and_raises_the_forget_loss():
    plain, before = ascent_training(0.0, ascent=False)
    ascended, _ = ascent_training(0.5)
    after = ascended.state_dict()
    # unselected elements, the unmasked bias and the BatchNorm statistics are bit-for-bit the original
    unselected = torch.tensor([[False, True, False, True]])
    assert torch.equal(after["linear.weight"][unselected], before["linear.weight"][unselected])
    for name in before:
        if name != "linear.weight":
            assert torch.equal(after[name], before[name]), name
    # the selected elements moved, and not as the plain repair moved them
    assert not torch.equal(after["linear.weight"], plain.state_dict()["linear.weight"])
    forget = DataLoader(rows(20, 7), batch_size=8)
    accelerator = Accelerator(cpu=True)
    assert mean_loss(ascended, forget, accelerator) > mean_loss(plain, forget, accelerator)


def test_forget_ascent_of_weight_zero_is_the_plain_training():
    plain, _ = ascent_training(0.0, ascent=False)
    unweighted, _ = ascent_training(0.0)
    assert all(torch.equal(value, plain.state_dict()[name]) for name, value in unweighted.state_dict().items())


def test_base_reset_learning_rate_replaces_the_probe_after_a_reset_to_base_only():
    from hf_deepclean.config import DeepCleanConfig
    from hf_deepclean.unlearning.probe import choose_repair_learning_rate

    torch.manual_seed(0)
    model = Regressor()
    train, evaluation = loaders()
    masks = {"linear.weight": torch.ones(1, 4, dtype=torch.bool)}
    accelerator = Accelerator(cpu=True)
    config = DeepCleanConfig(reset="base", base_reset_learning_rate=5e-5, repair_epochs=4)
    # no trial runs: the loaders are never read
    assert choose_repair_learning_rate(config, model, None, None, accelerator, masks) == (5e-5, None)
    given = DeepCleanConfig(reset="base", base_reset_learning_rate=5e-5, learning_rate=1e-2)
    assert choose_repair_learning_rate(given, model, None, None, accelerator, masks) == (1e-2, None)
    fresh = DeepCleanConfig(reset="init", base_reset_learning_rate=5e-5, repair_epochs=4)
    rate, probe = choose_repair_learning_rate(fresh, model, train, evaluation, accelerator, masks)
    assert probe is not None and rate == probe.rate and 5e-5 not in probe.losses


def test_probe_runs_no_trial_when_the_reset_did_no_measurable_damage():
    """Given the loss before the reset, a start within `min_damage` of it gets the smallest candidate and no trial;
    a start further above it gets the very sweep it gets without a reference."""

    def probe(reference_loss):
        model, before, found = probe_fresh_regressor(reference_loss=reference_loss)
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
        return found

    plain = probe(None)
    assert plain.steps == 6 and plain.losses and plain.reference_loss is None
    undamaged = probe(plain.start_loss / 1.04)  # the reset raised the loss 4%: within the default 5%
    assert undamaged.undamaged and undamaged.steps == 0 and undamaged.losses == {}
    assert undamaged.rate == 1e-4 and undamaged.start_loss == plain.start_loss
    damaged = probe(plain.start_loss / 1.06)  # 6%: trials as without a reference
    assert not damaged.undamaged and damaged.reference_loss == pytest.approx(plain.start_loss / 1.06)
    assert (damaged.rate, damaged.losses, damaged.steps) == (plain.rate, plain.losses, plain.steps)


def test_a_reset_that_did_damage_still_gets_trials_when_they_tie_at_chance():
    """The case the damage rule must not catch: a trained model (loss far below chance) reset to the chance loss,
    where short trials tie; the probe repeats them and picks the rate that repairs, as without a reference."""
    train = DataLoader(sign_rows(64, 1), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    evaluation = DataLoader(sign_rows(64, 2), batch_size=16)
    probe = probe_learning_rate(
        SlowStart(0.3),
        train,
        evaluation,
        Accelerator(cpu=True),
        candidates=(3e-3, 1e-3, 3e-4, 1e-4, 3e-5),
        max_steps=200,
        reference_loss=0.1,
    )
    assert not probe.undamaged and probe.separated and probe.steps == 160 and probe.rate == 3e-3


@pytest.mark.parametrize("masked", [False, True])
def test_probe_can_leave_the_model_with_the_chosen_trials_weights(masked):
    """`keep_chosen_trial`: the same sweep and choice, and the model ends exactly as a separate trial at the chosen
    rate leaves it (so a repair can go on from it); a masked trial's unselected elements stay the original's."""
    masks = {"linear.weight": torch.tensor([[True, False, True, False]])} if masked else None
    model, before, kept = probe_fresh_regressor(masks=masks, keep_chosen_trial=True)
    _, _, plain = probe_fresh_regressor(masks=masks, keep_chosen_trial=False)
    assert (kept.rate, kept.losses, kept.steps) == (plain.rate, plain.losses, plain.steps)
    assert plain.kept_steps == 0 and kept.kept_steps == 6
    expected = state(trial_model(kept.rate, 6, masks))
    after = state(model)
    assert all(torch.equal(after[name], expected[name]) for name in after)
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    if masked:
        assert torch.equal(after["linear.weight"][0, 1::2], before["linear.weight"][0, 1::2])
        assert torch.equal(after["linear.bias"], before["linear.bias"])
    # the sweep went on past the chosen rate: what the model kept is not merely the last trial's weights
    assert list(kept.losses)[-1] != kept.rate


def test_probe_keeps_the_last_sweeps_trial_and_none_from_a_sweep_that_did_not_separate():
    train = DataLoader(sign_rows(64, 1), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    evaluation = DataLoader(sign_rows(64, 2), batch_size=16)
    candidates = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
    for max_steps, kept_steps in ((200, 160), (None, 0)):
        model = SlowStart(0.3)
        found = probe_learning_rate(
            model,
            train,
            evaluation,
            Accelerator(cpu=True),
            candidates=candidates,
            max_steps=max_steps,
            keep_chosen_trial=True,
        )
        assert found.kept_steps == kept_steps and found.rate == 3e-3
        weight = model.linear.weight.detach()
        if kept_steps:  # the 160-step trial at 3e-3, the one that separated the rates
            reference = SlowStart(0.3)
            train.generator.manual_seed(0)
            train_model(
                reference,
                train,
                Accelerator(cpu=True),
                epochs=160 / len(train),
                learning_rate=3e-3,
                lr_scheduler_type="constant",
            )
            assert torch.equal(weight, reference.linear.weight.detach())
        else:  # the rates were never told apart: nothing to continue from
            assert torch.equal(weight, torch.zeros_like(weight))


@pytest.mark.parametrize("epochs", [0.5, 1.0, 2.0, 4.0, 7 / 3])
@pytest.mark.parametrize("steps_per_epoch", [1, 3, 47, 314])
def test_a_schedule_after_some_steps_trains_exactly_the_steps_left(epochs, steps_per_epoch):
    from hf_deepclean.unlearning.training import TrainingSchedule

    schedule = TrainingSchedule(epochs=epochs, learning_rate=1e-3)
    total = math.ceil(epochs * steps_per_epoch)
    for taken in sorted({0, 1, 10, 40, total - 1, total, total + 5}):
        if taken < 0:
            continue
        rest = schedule.after_steps(taken, steps_per_epoch)
        assert math.ceil(rest.epochs * steps_per_epoch) == max(0, total - taken)
        assert rest.learning_rate == schedule.learning_rate and rest.lr_scheduler_type == schedule.lr_scheduler_type
