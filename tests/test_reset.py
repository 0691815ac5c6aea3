"""Fisher ratio, selection, reset and masked repair."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from accelerate import Accelerator, PartialState
from conftest import build_tiny_bert, make_reviews
from torch.utils.data import DataLoader

from hf_deepclean.errors import DeepCleanError
from hf_deepclean.unlearning.repair import RepairMonitor, repair_selected_weights
from hf_deepclean.unlearning.reset import reset_selected_weights
from hf_deepclean.unlearning.selection import compute_fisher_ratio, reset_statistics, select_weights_to_reset


SHAPES = {"a.weight": (4, 5), "a.bias": (10,), "b.weight": (3, 2, 5)}  # 60 elements


def random_ratios(seed: int = 0, zero_share: float = 0.2) -> dict[str, torch.Tensor]:
    """Distinct positive ratios with about `zero_share` of the elements set to exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    ratios = {}
    for name, shape in SHAPES.items():
        values = torch.rand(shape, generator=generator) + 0.01
        values[torch.rand(shape, generator=generator) < zero_share] = 0.0
        ratios[name] = values
    return ratios


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def test_compute_fisher_ratio():
    generator = torch.Generator().manual_seed(0)
    forget = {name: torch.rand(shape, generator=generator) for name, shape in SHAPES.items()}
    retain = {name: torch.rand(shape, generator=generator) for name, shape in SHAPES.items()}
    retain["a.bias"][:3] = 0.0
    ratios = compute_fisher_ratio(forget, retain, eps=1e-3)
    assert set(ratios) == set(SHAPES)
    for name in SHAPES:
        torch.testing.assert_close(ratios[name], forget[name] / (retain[name] + 1e-3), rtol=1e-6, atol=0)
    with pytest.raises(DeepCleanError):
        compute_fisher_ratio(forget, {"a.weight": retain["a.weight"]})


def test_select_gamma():
    ratios = random_ratios()
    gamma = 0.5
    masks = select_weights_to_reset(ratios, gamma=gamma)
    assert set(masks) == set(ratios)
    for name, values in ratios.items():
        assert masks[name].dtype == torch.bool
        assert torch.equal(masks[name], values > gamma), name


def assert_top_selection(ratios: dict, masks: dict, count: int) -> None:
    """Exactly `count` elements selected, all with a positive ratio and none below an unselected one."""
    values, selected = flat(ratios), flat(masks)
    assert int(selected.sum()) == count
    assert bool((values[selected] > 0).all())
    assert float(values[selected].min()) >= float(values[~selected].max())


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_select_reset_fraction(fraction):
    ratios = random_ratios()
    total = sum(math.prod(shape) for shape in SHAPES.values())
    masks = select_weights_to_reset(ratios, reset_fraction=fraction)
    assert {name: m.shape for name, m in masks.items()} == {name: torch.Size(s) for name, s in SHAPES.items()}
    assert_top_selection(ratios, masks, round(fraction * total))


def test_select_fraction_ties_give_exact_count():
    ratios = {"a": torch.ones(10), "b": torch.full((10,), 2.0)}
    masks = select_weights_to_reset(ratios, reset_fraction=0.75)
    assert bool(masks["b"].all())
    assert int(masks["a"].sum()) == 5


@pytest.fixture
def accelerate_state():
    """accelerate's logger raises unless the process state exists; the selection logs warnings."""
    PartialState(cpu=True)


def test_max_reset_fraction_caps_gamma(accelerate_state, caplog):
    ratios = random_ratios()
    assert int((flat(ratios) > 0.05).sum()) > 15
    masks = select_weights_to_reset(ratios, gamma=0.05, max_reset_fraction=0.25)
    assert_top_selection(ratios, masks, 15)
    assert "max_reset_fraction" in caplog.text


def test_max_reset_fraction_caps_reset_fraction(accelerate_state):
    ratios = random_ratios()
    masks = select_weights_to_reset(ratios, reset_fraction=0.5, max_reset_fraction=0.25)
    assert_top_selection(ratios, masks, 15)


def test_zero_ratios_never_selected(accelerate_state, caplog):
    ratios = random_ratios(zero_share=0.5)
    positive = flat(ratios) > 0
    assert int(positive.sum()) < 60
    masks = select_weights_to_reset(ratios, reset_fraction=1.0)
    assert torch.equal(flat(masks), positive)
    assert "positive Fisher ratio" in caplog.text
    masks = select_weights_to_reset(ratios, gamma=1e-30)
    assert torch.equal(flat(masks), positive)


@pytest.mark.parametrize(
    "kwargs", [{"gamma": 10.0}, {"reset_fraction": 1e-4}, {"reset_fraction": 0.5, "max_reset_fraction": 0.005}]
)
def test_empty_selection_raises(kwargs):
    with pytest.raises(DeepCleanError, match="gamma"):
        select_weights_to_reset(random_ratios(), **kwargs)


def test_all_zero_ratios_raise():
    ratios = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    with pytest.raises(DeepCleanError, match="gamma"):
        select_weights_to_reset(ratios, reset_fraction=0.5)


def test_select_needs_a_rule():
    with pytest.raises(DeepCleanError):
        select_weights_to_reset(random_ratios())


def random_masks(model, names: list[str], share: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Bernoulli(`share`) masks over the named parameters, and an all-False mask on one more parameter."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    masks = {name: torch.rand(params[name].shape, generator=generator) < share for name in names}
    masks["bert.pooler.dense.weight"] = torch.zeros_like(params["bert.pooler.dense.weight"], dtype=torch.bool)
    for name in names:
        assert bool(masks[name].any()), name
    return masks


MASKED = [
    "bert.embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.1.output.dense.bias",
    "classifier.weight",
]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unselected_unchanged(model, before: dict, masks: dict) -> None:
    for name, p in model.named_parameters():
        keep = ~masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[keep], before[name][keep]), name


def test_reset_zero():
    model, _ = build_tiny_bert()
    masks = random_masks(model, MASKED)
    before = snapshot(model)
    reset_selected_weights(model, masks, reset="zero")
    params = dict(model.named_parameters())
    for name in MASKED:
        assert bool((params[name].detach()[masks[name]] == 0).all()), name
    assert_unselected_unchanged(model, before, masks)


def test_reset_init():
    model, _ = build_tiny_bert(seed=0)
    masks = random_masks(model, MASKED)
    before = snapshot(model)
    rng_state = torch.get_rng_state()
    reset_selected_weights(model, masks, reset="init", seed=123)
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.manual_seed(123)
    fresh = dict(type(model)(model.config).named_parameters())
    params = dict(model.named_parameters())
    for name in MASKED:
        selected = masks[name]
        assert torch.equal(params[name].detach()[selected], fresh[name].detach()[selected]), name
        if name.endswith(".weight"):  # biases are initialised to zero: a fresh value equals the old one
            assert not torch.equal(params[name].detach()[selected], before[name][selected]), name
    assert_unselected_unchanged(model, before, masks)


def test_reset_rejects_unknown_mode():
    model, _ = build_tiny_bert()
    with pytest.raises(DeepCleanError, match=r"^--reset: got 'gaussian'; expected one of init, zero, base\.$"):
        reset_selected_weights(model, random_masks(model, MASKED), reset="gaussian")


def test_reset_base(caplog):
    """Selected elements get the base model's values exactly; a parameter the base lacks, or holds with another
    shape, gets what `reset="init"` gives it with the same seed (said once in the log); the rest is untouched."""
    model, _ = build_tiny_bert(seed=0)
    base_model, _ = build_tiny_bert(seed=1)  # the "pretrained" weights: every value differs from the model's
    base = {name: p.detach().clone() for name, p in base_model.named_parameters() if not name.startswith("classifier")}
    base["bert.encoder.layer.1.output.dense.bias"] = torch.zeros(3)  # same name, another shape
    masks = random_masks(model, MASKED)
    before = snapshot(model)
    init_model, _ = build_tiny_bert(seed=0)
    reset_selected_weights(init_model, masks, reset="init", seed=123)
    init_values = dict(init_model.named_parameters())
    rng_state = torch.get_rng_state()

    with caplog.at_level(logging.INFO, logger="hf_deepclean.unlearning.reset"):
        fallback = reset_selected_weights(model, masks, reset="base", seed=123, base_values=base)

    assert torch.equal(torch.get_rng_state(), rng_state)
    assert fallback == ["bert.encoder.layer.1.output.dense.bias", "classifier.weight"]
    params = dict(model.named_parameters())
    for name in MASKED:
        selected = masks[name]
        expected = init_values[name] if name in fallback else base[name]
        assert torch.equal(params[name].detach()[selected], expected.detach()[selected]), name
        if name.endswith(".weight"):  # biases are initialised to zero: a fresh value equals the old one
            assert not torch.equal(params[name].detach()[selected], before[name][selected]), name
    assert_unselected_unchanged(model, before, masks)
    records = [record for record in caplog.records if record.name == "hf_deepclean.unlearning.reset"]
    messages = [record.getMessage() for record in records]
    assert len(messages) == 1 and records[0].levelno == logging.INFO, messages
    assert "2 of 4 selected parameters have no base value (1 of them a base tensor of another shape)" in messages[0]
    assert "classifier.weight" in messages[0]


def test_reset_base_needs_base_values_and_warns_when_none_match(caplog):
    model, _ = build_tiny_bert()
    masks = random_masks(model, MASKED)
    with pytest.raises(DeepCleanError, match=r"^--reset: got 'base' without base values"):
        reset_selected_weights(model, masks, reset="base")
    with caplog.at_level("INFO", logger="hf_deepclean.unlearning.reset"):
        fallback = reset_selected_weights(model, masks, reset="base", base_values={"unrelated.weight": torch.ones(2)})
    assert fallback == MASKED
    assert "none of the selected parameters has a base value" in caplog.text


def test_repair_changes_only_selected_elements():
    model, tokenizer = build_tiny_bert()
    masks = random_masks(model, MASKED)
    reset_selected_weights(model, masks, reset="zero")
    frozen = "bert.embeddings.position_embeddings.weight"
    model.get_parameter(frozen).requires_grad_(False)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    before = snapshot(model)

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return batch

    dataloader = DataLoader(make_reviews(16, seed=5), batch_size=4, collate_fn=collate)
    accelerator = Accelerator(cpu=True)
    result = repair_selected_weights(
        model, masks, dataloader, accelerator, epochs=2, learning_rate=1e-2, weight_decay=0.1
    )
    assert result["steps"] == 8
    assert math.isfinite(result["final_loss"])
    assert_unselected_unchanged(model, before, masks)
    params = dict(model.named_parameters())
    for name in MASKED:
        selected = masks[name]
        changed = params[name].detach()[selected] != before[name][selected]
        assert bool(changed.any()), name
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert not requires_grad[frozen]


def test_repair_monitor_leaves_the_repair_unchanged():
    """A monitor whose criterion is never met must not change the repair: its evaluations run between training
    steps, and every DataLoader iteration draws a seed from the global random state that the repair's shuffling and
    dropout draw from after."""

    def repair(monitor_rows: int | None) -> dict[str, torch.Tensor]:
        model, tokenizer = build_tiny_bert()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = dict(tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"))
            batch["labels"] = torch.tensor([r["label"] for r in rows])
            return batch

        masks = random_masks(model, MASKED, share=0.3)
        reset_selected_weights(model, masks, reset="zero")
        accelerator = Accelerator(cpu=True)
        monitor = None
        if monitor_rows is not None:
            loaders = {
                split: DataLoader(make_reviews(monitor_rows, seed=seed), batch_size=4, collate_fn=collate)
                for seed, split in enumerate(("forget", "retain", "test"))
            }
            monitor = RepairMonitor(model, loaders, accelerator, target_retain_accuracy=2.0, check_every=1)
        torch.manual_seed(0)
        dataloader = DataLoader(make_reviews(16, seed=5), batch_size=4, shuffle=True, collate_fn=collate)
        result = repair_selected_weights(
            model, masks, dataloader, accelerator, epochs=2, learning_rate=1e-2, should_stop=monitor
        )
        assert result["steps"] == 8 and not result["stopped_early"]
        if monitor is not None:
            assert len(monitor.history) == 7  # a check after every step but the last
        return snapshot(model)

    plain, monitored = repair(None), repair(8)
    assert all(torch.equal(plain[name], monitored[name]) for name in plain)


def test_reset_statistics():
    masks = {
        "a": torch.tensor([True, False, False, True]),
        "b": torch.zeros(2, 3, dtype=torch.bool),
        "c": torch.ones(2, 5, dtype=torch.bool),
    }
    statistics = reset_statistics(masks)
    assert {name: count.to_dict() for name, count in statistics.per_parameter.items()} == {
        "a": {"reset": 2, "numel": 4, "share": 0.5},
        "b": {"reset": 0, "numel": 6, "share": 0.0},
        "c": {"reset": 10, "numel": 10, "share": 1.0},
    }
    assert statistics.total.to_dict() == {"reset": 12, "numel": 20, "share": 0.6}
    masks = {"layer.weight": masks["a"], "layer.bias": masks["b"], "head.weight": masks["c"]}
    assert reset_statistics(masks).per_module() == {"layer": 2 / 10, "head": 1.0}


def test_adapter_initial_values_follow_lora_init_and_leave_the_model_unchanged():
    """`reset=init` on LoRA weights: A gets fresh random values, B zeros (peft's own initialisation), the
    modules_to_save head the architecture's init; reading them does not change the model."""
    from peft import LoraConfig, get_peft_model

    from hf_deepclean.modeling import get_parameters_in_scope
    from hf_deepclean.unlearning.reset import initial_values

    model, _ = build_tiny_bert()
    config = LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False)
    model = get_peft_model(model, config)
    names = list(get_parameters_in_scope(model, "adapter"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fresh = initial_values(model, names, seed=0)
    assert set(fresh) == set(names)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    for name in names:
        assert fresh[name].shape == before[name].shape
        if "lora_B" in name:
            assert not bool(fresh[name].any()), name
        elif name.endswith("weight"):  # (the head's bias starts at zero, as it is now)
            assert not torch.equal(fresh[name], before[name]), name
    assert torch.equal(initial_values(model, names, seed=0)[names[0]], fresh[names[0]])  # seeded
