"""Knobs from different issues that cannot be combined are refused at config time, naming both fields."""

import warnings

import pytest

from tests.helpers import config


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(distill_mode="uld", lmbda=0.5), r"distill_mode='uld'.*lmbda=0.5"),
        (dict(distill_mode="uld", seq_kd=True), r"distill_mode='uld'.*seq_kd=True"),
        (dict(teacher_cache="store", kd_top_k=8, lmbda=1.0), r"teacher_cache.*lmbda=1.0"),
        (dict(teacher_cache="store", kd_top_k=8, seq_kd=True), r"teacher_cache.*seq_kd=True"),
        (dict(teacher_cache="store", kd_top_k=8, feature_weight=0.5), r"feature_weight=0.5.*teacher_cache"),
        (dict(distill_mode="uld", feature_weight=0.5), r"feature_weight=0.5.*distill_mode='uld'"),
        (dict(distill_mode="sequence", lmbda=0.5), r"distill_mode='sequence'.*lmbda=0.5"),
    ],
)
def test_incompatible_knobs_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        # on-policy token KD (alpha=1.0 as in GKD) with a feature term: the teacher reads the samples
        dict(lmbda=0.5, alpha=1.0, feature_weight=0.1),
        dict(teacher_cache="store", kd_top_k=8),  # offline teacher, off-policy
        dict(distill_mode="uld", uld_top_k=8),
    ],
)
def test_compatible_knobs_are_accepted(tmp_path, kwargs):
    # Accepted as given: no knob reset or ignored by the validation, and no warning about any of them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = config(tmp_path, **kwargs)
    for name, value in kwargs.items():
        assert getattr(args, name) == value, name
    about_knobs = [str(w.message) for w in caught if any(name in str(w.message) for name in kwargs)]
    assert not about_knobs, about_knobs
