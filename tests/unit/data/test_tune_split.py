"""The held-out tuning split (dataset.tune_fraction): disjoint, seeded by tune_seed alone, and a
tuning run's datasets never list the val split."""
from __future__ import annotations

import pytest

from kdseg.data import build_datasets, tune_split
from kdseg.errors import ConfigError

from ...conftest import compose_config


def test_tune_split_is_a_seeded_disjoint_partition():
    rest, held = tune_split(100, 0.2, seed=0)
    assert len(held) == 20 and len(rest) == 80
    assert sorted(rest + held) == list(range(100)) and not set(rest) & set(held)
    assert rest == sorted(rest) and held == sorted(held)
    assert tune_split(100, 0.2, seed=0) == (rest, held)  # the seed alone decides
    assert tune_split(100, 0.2, seed=1)[1] != held
    assert tune_split(10, 0.25, seed=0)[1].__len__() == 2  # round(2.5) = 2 (to even)


@pytest.mark.parametrize("n, fraction", [(10, 0.01), (3, 0.5), (10, 0.95)])
def test_tune_split_refuses_an_empty_part(n, fraction):
    with pytest.raises(ConfigError, match=rf"dataset.tune_fraction={fraction} holds out \d+ of the {n} train images"):
        tune_split(n, fraction, seed=0)


def test_a_tuning_runs_datasets_come_from_the_train_split_only(session_dir):
    common = [f"paths.root_dir={session_dir}", f"paths.output_dir={session_dir}", f"paths.data_dir={session_dir}/data",
              "dataset.num_train=20", "dataset.num_val=8"]
    full_train, full_val = build_datasets(compose_config(common).dataset)
    train, val = build_datasets(compose_config([*common, "dataset.tune_fraction=0.25", "dataset.tune_seed=3"]).dataset)
    listed = set(full_train.samples)
    assert len(val) == 5 and len(train) == 15
    assert set(train.samples) | set(val.samples) == listed and not set(train.samples) & set(val.samples)
    assert not (set(train.samples) | set(val.samples)) & set(full_val.samples)  # no val image anywhere
    _, held = tune_split(20, 0.25, seed=3)
    assert val.samples == [full_train.samples[i] for i in held]
    # scored with the val transforms (whole images), trained with the train ones
    assert val.transforms.__class__ is full_val.transforms.__class__ and str(val.transforms) == str(full_val.transforms)
    assert str(train.transforms) == str(full_train.transforms)
