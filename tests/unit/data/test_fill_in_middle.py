"""The one check that a tokenizer, or an exported model, can fill bars, and the training rate an
export records for it."""

import logging

import pytest

from data_pipeline.config import TokenizerConfig, TokenizerKind
from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.data.fill_in_middle import InfillTraining, check_infillable, trained_infill_rate


@pytest.fixture(scope="module")
def remi() -> MusicTokenizer:
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])


def test_a_runs_infill_rate_is_read_from_its_config_and_is_zero_from_before_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    assert trained_infill_rate(config) is None  # no config at hand
    config.write_text("data:\n  infill_rate: 0.25\n")
    assert trained_infill_rate(config) == 0.25
    config.write_text("data:\n  path: data/bach\n")
    assert trained_infill_rate(config) == 0.0


def test_training_and_filling_are_refused_by_the_same_rule_naming_what_asked(remi):
    without_bars = MusicTokenizer(
        build_base_tokenizer(TokenizerConfig(kind=TokenizerKind.MIDILike)), []
    )
    with pytest.raises(ConfigError, match=r"^data.infill_rate=0.5 fills whole bars, and the "):
        InfillTraining(without_bars, 0.5, 128)
    # Filling with a trained model also says to train on the data prepared again.
    with pytest.raises(ConfigError, match=r"^infill=bars:2-3 fills .*train on it with data"):
        check_infillable(without_bars, "infill=bars:2-3", {"data": {"infill_rate": 0.5}})
    with pytest.raises(ConfigError, match=r"^infill.bars=2: the model was trained with data"):
        check_infillable(remi, "infill.bars=2", {"data": {"infill_rate": 0.0}})
    check_infillable(remi, "infill.bars=2", {"data": {"infill_rate": 0.5}})
    check_infillable(remi, "data.infill_rate=0.5")  # a model yet to train: the tokenizer only


def test_an_export_from_before_the_rate_was_recorded_fills_with_a_warning(remi, caplog):
    with caplog.at_level(logging.WARNING):
        check_infillable(remi, "infill=bars:2-3", {"model": {}, "step": 10})
    assert "records no data.infill_rate" in caplog.text and "export it again" in caplog.text
