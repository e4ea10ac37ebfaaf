"""Resume messages show numbers as a user wrote them (issue 23): 0.0003, not
0.00030000000000000003, with digits added only where two values would read alike."""

from __future__ import annotations

from phoenix.checkpoint.resume_contract import ConfigChange, readable_pair


def test_floats_are_rounded_for_reading():
    assert str(ConfigChange("optim.lr", 3e-3, 0.1 * 3e-3)) == "optim.lr: 0.003 -> 0.0003"
    assert str(ConfigChange("optim.adam_beta2", 0.95, 0.5)) == "optim.adam_beta2: 0.95 -> 0.5"
    assert str(ConfigChange("model.norm_epsilon", 1e-5, 1e-6)) == \
        "model.norm_epsilon: 1e-05 -> 1e-06"


def test_close_values_keep_the_digits_that_tell_them_apart():
    a, b = readable_pair(3e-4, 3e-4 * (1 + 1e-9))
    assert a != b and float(a) == 3e-4 and len(a) < len(repr(3e-4 * (1 + 1e-9)))


def test_other_values_are_shown_as_before():
    assert str(ConfigChange("train.seed", 1234, 7)) == "train.seed: 1234 -> 7"
    assert str(ConfigChange("name", "a", "b")) == "name: 'a' -> 'b'"
    assert str(ConfigChange("x", True, False)) == "x: True -> False"
