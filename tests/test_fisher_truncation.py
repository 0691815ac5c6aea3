"""Text longer than the model's positions: truncated from the model's config for every task, when the tokenizer
declares no smaller limit (issue 16, item 4)."""

from __future__ import annotations

import pytest
from conftest import make_reviews
from datasets import Dataset
from transformers import BertConfig, GPT2Config, RobertaConfig, T5Config

from hf_deepclean.cli import main
from hf_deepclean.data.loading import model_position_limit


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        (BertConfig(max_position_embeddings=64), 64),
        (RobertaConfig(max_position_embeddings=514, pad_token_id=1), 512),  # positions start after the padding index
        (GPT2Config(n_positions=32), 32),
        (T5Config(), None),  # relative positions: no table to overrun
    ],
    ids=["bert", "roberta", "gpt2", "t5"],
)
def test_model_position_limit(config, limit):
    assert model_position_limit(config) == limit


def test_classifier_with_an_unlimited_tokenizer_truncates_to_its_positions(tmp_path, text_model_dir, capsys):
    """The tiny BERT has 64 positions and its tokenizer declares no length limit; one review has 300 words."""
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(text_model_dir).max_position_embeddings == 64
    assert AutoTokenizer.from_pretrained(text_model_dir).model_max_length > 10**6
    rows = make_reviews(40, seed=1)
    rows[3]["text"] = " ".join(["the good movie"] * 100)
    Dataset.from_list(rows).to_csv(tmp_path / "train.csv", index=False)
    Dataset.from_list(make_reviews(10, seed=2)).to_csv(tmp_path / "test.csv", index=False)
    code = main(
        [
            "unlearn",
            "--model_name_or_path",
            str(text_model_dir),
            "--dataset_name",
            "csv",
            "--data_files",
            f"train={tmp_path / 'train.csv'}",
            f"test={tmp_path / 'test.csv'}",
            "--forget",
            f"where:id=={rows[3]['id']}",
            "--output_dir",
            str(tmp_path / "cleaned"),
            "--repair_epochs",
            "0",
        ]  # fmt: skip
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "cleaned").is_dir()
