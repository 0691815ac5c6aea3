"""Weights sharded by FSDP2 (`fully_shard`), two processes on CPU (gloo), against one unsharded process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_deepclean.errors import DeepCleanError
from hf_deepclean.sharding import row_block, shard_model


@pytest.fixture(scope="module")
def fisher_blocks(tmp_path_factory):
    """Each rank's blocks of the Fisher sums of a tiny BERT (empirical) and a tiny GPT-2 with tied embeddings (true
    Fisher, sampled token labels), and the same rows of the unsharded sums."""
    from conftest import run_torchrun

    output = tmp_path_factory.mktemp("fsdp") / "fisher"
    log = run_torchrun([str(Path(__file__).parent / "fsdp_worker.py"), str(output)])
    files = [Path(f"{output}.rank{rank}.safetensors") for rank in range(2)]
    assert all(f.exists() for f in files), log[-3000:]
    return [load_file(f) for f in files]


def test_sharded_fisher_blocks_equal_the_unsharded_sums(fisher_blocks):
    for tensors in fisher_blocks:
        blocks = {k: v for k, v in tensors.items() if ".block." in k}
        assert len(blocks) == 57  # every parameter of both models
        for key, block in blocks.items():
            whole = tensors[key.replace(".block.", ".whole.")]
            assert block.shape == whole.shape, key
            torch.testing.assert_close(block, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()) + 1e-30)
    # the blocks split the rows by torch.chunk: 11 embedding rows of the GPT-2 as 6 and 5, covering each row once
    assert fisher_blocks[0]["gpt2.block.transformer.wte.weight"].shape[0] == 6
    assert fisher_blocks[1]["gpt2.block.transformer.wte.weight"].shape[0] == 5
    # and the sums are not trivially zero
    assert float(fisher_blocks[1]["gpt2.block.transformer.wte.weight"].sum()) > 0


def test_whole_tensors_are_one_block():
    weight = torch.zeros(5, 3)
    assert row_block(weight) == (0, 5)


def test_shard_model_refuses_a_model_without_the_named_blocks():
    with pytest.raises(DeepCleanError, match="no module of Linear has a class in"):
        shard_model(torch.nn.Linear(2, 2), wrap=("BertLayer",))
