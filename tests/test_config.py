"""The one config base: every config and option class round-trips through JSON, rejects keys
it does not have, rebuilds nested configs, and names every bad field with its rule."""

from __future__ import annotations

import json
import os
import re

import pytest

from asr.config import Config
from asr.decoding.options import DecodeOptions
from asr.features import FeatureConfig, SpecAugmentConfig
from asr.models.bilstm_ctc import BiLSTMCTCConfig
from asr.models.las import LASConfig
from asr.streaming import EndpointConfig
from asr.training.config import PRESETS, TrainConfig
from server.config import ServerConfig

CONFIGS: list[Config] = [
    DecodeOptions(method="joint", beam=4, prune_top_k=None),
    FeatureConfig(num_mel_bins=40),
    SpecAugmentConfig(time_ratio=0.1),
    EndpointConfig(trailing_silence=0.5),
    TrainConfig(spec_augment=None),
    PRESETS["cpu-small"],  # a nested SpecAugmentConfig
    BiLSTMCTCConfig(chunk_size=8, right_context=4),
    LASConfig(vocab_size=64, ctc_layer=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trips_through_json(config: Config) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_unknown_keys_are_refused(config: Config) -> None:
    name = type(config).__name__
    with pytest.raises(ValueError, match=f"unknown {name} fields: bogus, zz"):
        type(config).from_dict(config.to_dict() | {"zz": 1, "bogus": 2})


def test_nested_configs_are_rebuilt_and_checked() -> None:
    train = TrainConfig.from_dict(PRESETS["cpu-small"].to_dict())
    assert isinstance(train.spec_augment, SpecAugmentConfig)
    data = PRESETS["cpu-small"].to_dict()
    data["spec_augment"]["nope"] = 1
    with pytest.raises(ValueError, match="unknown SpecAugmentConfig fields: nope"):
        TrainConfig.from_dict(data)


def test_every_bad_field_is_named_with_its_rule() -> None:
    with pytest.raises(ValueError) as err:
        DecodeOptions(beam=0, ctc_weight=2.0)
    assert str(err.value) == (
        "invalid DecodeOptions: beam must be >= 1, got 0; ctc_weight must be in [0, 1], got 2.0"
    )
    with pytest.raises(ValueError, match="invalid EndpointConfig: max_segment must be > 0"):
        EndpointConfig(max_segment=0.0)
    with pytest.raises(
        ValueError, match="precision must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"
    ):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hop_ms must be in"):
        FeatureConfig(hop_ms=30.0)
    with pytest.raises(ValueError, match="invalid ServerConfig: max_batch must be > 0, got 0"):
        ServerConfig(models=(("m", "dir"),), max_batch=0)
    bad_workers = re.escape("workers must be >= 0 (0: one per core), got -1")
    with pytest.raises(ValueError, match=bad_workers):
        ServerConfig(models=(("m", "dir"),), workers=-1)
    assert ServerConfig(models=(("m", "dir"),), workers=3).worker_count == 3
    cores = len(os.sched_getaffinity(0))
    assert ServerConfig(models=(("m", "dir"),), torch_threads=cores).worker_count == 1


def test_wrong_types_are_value_errors_naming_the_field() -> None:
    # Checked before any rule runs, so a rule never meets a value it cannot compare.
    with pytest.raises(ValueError) as err:
        DecodeOptions(beam="abc", prune_top_k=2.5, word_timings=1)  # type: ignore[arg-type]
    assert str(err.value) == (
        "invalid DecodeOptions: beam must be an integer, got 'abc'; prune_top_k must be an "
        "integer or None, got 2.5; word_timings must be true or false, got 1"
    )
    with pytest.raises(ValueError, match="lr must be a number, got '1e-3'"):
        TrainConfig.from_dict(TrainConfig().to_dict() | {"lr": "1e-3"})
    with pytest.raises(ValueError, match="listener must be one of 'pyramid', 'conv-pyramid'"):
        LASConfig(vocab_size=64, listener="transformer")  # type: ignore[arg-type]
    assert DecodeOptions(length_penalty=1).length_penalty == 1  # an int is a number
