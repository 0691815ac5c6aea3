"""Many processes: `scripts/unlearn.py` under `torchrun` against one process, and the set-ups that are refused.

The end-to-end test launches 2 processes on CPU (gloo), each with per-process batch 4, and compares them with one
process with batch 8: the same global batches in the same order, so the same run up to float summation order.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from unlearn_worker import SCRIPT

from hf_deepclean.config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from hf_deepclean.distributed import check_parallelism
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.hub.push import read_reports
from hf_deepclean.pipeline.unlearn import unlearn


# Tolerance of the cleaned weights, 2 processes against 1, elementwise: |two - one| <= ATOL + RTOL * |one|.
# The selection is identical and the unselected weights are equal bit for bit (checked exactly). Repaired elements
# differ only by float32 summation order: Fisher sums reduced across processes, and the global batch's gradient
# averaged over two half-batch means instead of one mean over 8 rows (measured: at most 7.5e-9 here). A real fault
# (gradients not averaged, another batch order or learning-rate schedule) moves an element by about one AdamW step,
# the learning rate (1e-3): three orders of magnitude above ATOL.
ATOL, RTOL = 1e-6, 1e-5
REPO = "org/tiny-bert-two-processes"


def _unlearn_arguments(model_dir, csv_dir, output_dir, batch_size: int) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", "csv",
        "--data_files", f"train={csv_dir / 'train.csv'}", f"test={csv_dir / 'test.csv'}",
        "--forget", "random:0.2",  # 12 forget rows, 48 retain rows, 20 held-out rows
        "--repair_epochs", "2",
        "--early_stopping", "false",  # the whole repair: 12 steps on either layout
        "--per_device_batch_size", str(batch_size),
        "--output_dir", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_and_two_processes(text_model_dir, text_csv_files, tmp_path_factory, hub_server):
    """The same unlearning request run by `scripts/unlearn.py` on 2 processes (with a push to the loopback Hub) and
    by the library on 1 process (in this process)."""
    from conftest import torchrun_process
    from unlearn_worker import record_processes

    work = tmp_path_factory.mktemp("processes")
    two_dir, one_dir = work / "two", work / "one"
    two_dir.mkdir()
    arguments = _unlearn_arguments(text_model_dir, text_csv_files, two_dir / "cleaned", batch_size=4)
    arguments += ["--push_to_hub", "--hub_model_id", REPO]
    worker = str(SCRIPT.parent.parent / "tests" / "unlearn_worker.py")
    launch = torchrun_process([worker, str(work / "records-two"), *arguments], env=hub_server.env(), timeout=300)

    import hf_deepclean.pipeline.unlearn as unlearn_module
    from hf_deepclean.cli import main

    with pytest.MonkeyPatch.context() as patch:
        # the same recording wrappers in this process: what they replace is put back on leaving the context
        for name in ("unlearn", "save_output", "push_output_dir"):
            patch.setattr(unlearn_module, name, getattr(unlearn_module, name))
        (work / "records-one").mkdir()
        record_processes(str(work / "records-one"))
        status = main(["unlearn", *_unlearn_arguments(text_model_dir, text_csv_files, one_dir / "cleaned", 8)])
    assert status == 0
    return SimpleNamespace(work=work, launch=launch, two=two_dir / "cleaned", one=one_dir / "cleaned")


def _record(folder, rank: int) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def test_two_processes_finish_cleanly_and_write_and_push_once(one_and_two_processes, hub_server):
    run = one_and_two_processes
    output = run.launch.stdout
    assert run.launch.returncode == 0, output[-4000:]  # every process exited with status 0
    ranks = [_record(run.work / "records-two", rank) for rank in (0, 1)]
    assert [(r["rank"], r["num_processes"], r["save"], r["push"]) for r in ranks] == [(0, 2, 1, 1), (1, 2, 0, 0)]
    # one folder, complete, nothing else next to it (no staging folder of another process)
    assert [p.name for p in run.two.parent.iterdir()] == ["cleaned"]
    config, results = read_reports(run.two)
    assert config.num_processes == 2  # one gloo group of 2 (not 2 independent copies)
    # every row evaluated once: Accelerate's repeats (12, 48 and 20 rows in batches of 4 on 2 processes) dropped
    assert results.evaluated_rows == {"forget": 12, "retain": 48, "test": 20}
    assert results.fisher.forget_samples == 12 and results.fisher.retain_samples == 48
    repo = hub_server.state()[f"model:{REPO}"]
    assert len(repo["commits"]) == 2  # the repository's first commit, then one upload
    # each log line, result line and progress bar once
    for line in (
        "Forget set: 12 rows of split 'train'",
        "Reset ",
        f"Saved the cleaned model to {run.two}",
        f"Cleaned model written to {run.two}",
        "Pushed to the Hub: ",
        '"after": {',
    ):
        assert output.count(line) == 1, (line, output[-4000:])
    for bar in ("Loading weights", "before forget", "Fisher forget", "Fisher retain", "Repair", "after test"):
        assert len(re.findall(rf"{bar}:\s+0%", output)) == 1, (bar, output[-4000:])


def test_two_processes_select_and_clean_like_one(one_and_two_processes, text_model_dir):
    run = one_and_two_processes
    one = _record(run.work / "records-one", 0)
    two = [_record(run.work / "records-two", rank) for rank in (0, 1)]
    original = load_file(text_model_dir / "model.safetensors")
    assert one["num_processes"] == 1 and one["save"] == 1
    for record in two:
        # the selection: identical to one process's, on every process
        assert record["masks"].keys() == one["masks"].keys()
        for name, mask in one["masks"].items():
            assert torch.equal(record["masks"][name], mask), name
        # every process holds the very same weights; unselected ones are bit-for-bit the original
        for name, weight in record["weights"].items():
            assert torch.equal(weight, two[0]["weights"][name]), name
            kept = ~record["masks"][name] if name in record["masks"] else torch.ones_like(weight, dtype=torch.bool)
            assert torch.equal(weight[kept], original[name][kept]), name
    assert sum(int(mask.sum()) for mask in one["masks"].values()) > 0
    # the cleaned weights written: as one process's, to float32 summation order
    cleaned_two, cleaned_one = load_file(run.two / "model.safetensors"), load_file(run.one / "model.safetensors")
    moved = 0.0
    for name, weight in cleaned_one.items():
        torch.testing.assert_close(cleaned_two[name], weight, atol=ATOL, rtol=RTOL, msg=name)
        moved = max(moved, float((weight - original[name]).abs().max()))
    assert moved > 100 * ATOL  # the repair did move the selected weights well beyond the tolerance
    _, results_one = read_reports(run.one)
    _, results_two = read_reports(run.two)
    assert results_two.reset.selection_sha256 == results_one.reset.selection_sha256
    assert results_two.repair.steps == results_one.repair.steps == 12
    assert results_two.metrics_before == pytest.approx(results_one.metrics_before, abs=1e-5)
    # the attack's AUC ranks forget against held-out losses (12 x 20 pairs): rows of the same text tie exactly in one
    # layout and only to float round-off in the other (other batches, other padding), which moves it by half a pair
    after_two, after_one = dict(results_two.metrics_after), dict(results_one.metrics_after)
    assert after_two.pop("mia_auc") == pytest.approx(after_one.pop("mia_auc"), abs=1 / 240)
    assert after_two == pytest.approx(after_one, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Set-ups that shard the weights are refused up front
# --------------------------------------------------------------------------------------------------------------


def _accelerator(distributed_type, fsdp_plugin=None, deepspeed_plugin=None, parallelism_config=None, processes=2):
    """What `check_parallelism` reads of an Accelerator."""
    state = SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin)
    return SimpleNamespace(
        distributed_type=distributed_type, state=state, parallelism_config=parallelism_config, num_processes=processes
    )


def _fsdp(version=2, offload=False, wrap="LlamaDecoderLayer", policy=None):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return SimpleNamespace(
        fsdp_version=version,
        cpu_offload=CPUOffloadPolicy() if offload else OffloadPolicy(),
        transformer_cls_names_to_wrap=wrap,
        auto_wrap_policy=policy,
        reshard_after_forward=True,
        mixed_precision_policy=None,
    )


@pytest.mark.parametrize(
    ("accelerator", "named", "instead"),
    [
        (_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3)), "ZeRO stage 3", "FSDP version 2"),
        (_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=2)), "ZeRO stage 2", "FSDP version 2"),
        (_accelerator(DistributedType.MEGATRON_LM), "got Megatron-LM", "FSDP version 2"),
        (_accelerator(DistributedType.MULTI_GPU, parallelism_config=SimpleNamespace(tp_enabled=True)), "with tp > 1", "FSDP version 2"),
        (_accelerator(DistributedType.FSDP, fsdp_plugin=_fsdp(version=1)), "got FSDP version 1", "fsdp_version: 2"),
        (_accelerator(DistributedType.FSDP, fsdp_plugin=_fsdp(offload=True)), "fsdp_offload_params: true", "expected false"),
        (_accelerator(DistributedType.FSDP, fsdp_plugin=_fsdp(wrap=None, policy=lambda: None)), "wrap policy", "TRANSFORMER_BASED_WRAP"),
        (SimpleNamespace(**vars(_accelerator(DistributedType.FSDP, fsdp_plugin=_fsdp())), mixed_precision="fp16"), "fp16 with FSDP", "bf16 or no"),
    ],
)  # fmt: skip
def test_unsupported_setups_are_refused_with_what_to_use_instead(accelerator, named, instead):
    with pytest.raises(DeepCleanError) as error:
        check_parallelism(accelerator)
    message = str(error.value)
    assert named in message and instead in message and "\n" not in message


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_data_parallel_setups_are_accepted(kind):
    check_parallelism(_accelerator(kind, parallelism_config=SimpleNamespace(dp_replicate_enabled=True)))


def test_fsdp2_is_accepted_with_its_plan():
    from hf_deepclean.distributed import sharding_plan

    accelerator = _accelerator(DistributedType.FSDP, fsdp_plugin=_fsdp())
    check_parallelism(accelerator)
    plan = sharding_plan(accelerator)
    assert plan.wrap == ("LlamaDecoderLayer",) and plan.reshard_after_forward
    assert sharding_plan(_accelerator(DistributedType.MULTI_GPU)) is None


def test_fsdp_settings_of_a_cpu_launch_come_from_accelerates_variables(monkeypatch):
    """Accelerate runs an FSDP configuration on CPUs as plain processes; the plan is read from the FSDP_* variables
    that `accelerate launch --config_file fsdp.yaml` sets."""
    from hf_deepclean.distributed import sharding_plan

    for key, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "BertLayer",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
    }.items():
        monkeypatch.setenv(key, value)
    plan = sharding_plan(_accelerator(DistributedType.MULTI_CPU))
    assert plan.wrap == ("BertLayer",) and not plan.reshard_after_forward
    assert sharding_plan(_accelerator(DistributedType.MULTI_CPU, processes=1)) is None  # one process: nothing to shard


def test_unlearn_refuses_an_unsupported_accelerator_before_loading(tmp_path):
    with pytest.raises(DeepCleanError, match="got DeepSpeed ZeRO stage 3, whose engine owns the weights"):
        unlearn(
            DeepCleanConfig(),
            ModelArguments(str(tmp_path / "no-such-model")),  # loading it would fail with another error
            DataArguments(str(tmp_path / "no-such-data"), forget="random:0.1"),
            OutputArguments(str(tmp_path / "out")),
            accelerator=_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3)),
        )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Every command takes its Accelerator from `default_accelerator()` (gloo by itself under a CPU launch)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["unlearn", "fisher", "evaluate", "benchmark"])
def test_every_command_asks_default_accelerator(
    command, monkeypatch, capsys, text_model_dir, text_csv_files, tmp_path
):
    from hf_deepclean.cli import main

    asked = []

    def spy():
        asked.append(command)
        raise DeepCleanError("stopped by the test")

    for module in ("pipeline.session", "bench.benchmark"):
        monkeypatch.setattr(f"hf_deepclean.{module}.default_accelerator", spy)
    data = _unlearn_arguments(text_model_dir, text_csv_files, tmp_path / "out", 8)[:7]  # model and data flags
    arguments = {
        "unlearn": [*data, "--forget", "random:0.2", "--output_dir", str(tmp_path / "out")],
        "fisher": [*data, "--fisher_output", str(tmp_path / "sums.safetensors")],
        "evaluate": [*data, "--forget", "random:0.2"],
        "benchmark": ["--output_dir", str(tmp_path / "bench")],
    }[command]
    assert main([command, *arguments]) == 2
    assert asked == [command] and "stopped by the test" in capsys.readouterr().err


def test_a_usage_error_on_two_processes_is_one_line_without_a_rank_traceback(text_csv_files, tmp_path):
    from conftest import torchrun_process

    output_dir = tmp_path / "cleaned"
    arguments = _unlearn_arguments(tmp_path / "no_such_model", text_csv_files, output_dir, batch_size=4)
    launch = torchrun_process([str(SCRIPT), *arguments], timeout=120)
    assert launch.returncode != 0
    errors = [line for line in launch.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--model_name_or_path" in errors[0] and "no_such_model" in errors[0]
    # the other process passed the loading barrier and met the same error: no broken connection, no rank traceback
    assert "[rank1]" not in launch.stdout and "Connection closed" not in launch.stdout
    assert not output_dir.exists()


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_process_shards_cover_every_row_once_in_order(world):
    """The Fisher passes' sharding: the shards, in rank order, are the rows themselves (none repeated, none lost), and
    each offset is the index of the shard's first row, so per-row seeds match one process's."""
    from datasets import Dataset

    from hf_deepclean.distributed import process_shard

    rows = Dataset.from_dict({"n": list(range(7))})
    seen = []
    for rank in range(world):
        accelerator = SimpleNamespace(num_processes=world, process_index=rank)
        shard, offset = process_shard(rows, accelerator)
        assert offset == len(seen)
        seen.extend(shard["n"])
    assert seen == list(range(7))
