"""``folora_ds.common.checks``: every check names the argument, its value and what is allowed, and never lets a
``bool`` pass for an integer or a number."""

from __future__ import annotations

import math

import pytest

from folora_ds.common.checks import is_integer, require, require_choice, require_int, require_real


def test_is_integer_refuses_bools_and_floats():
    assert is_integer(3) and is_integer(0) and is_integer(-2)
    assert not is_integer(True) and not is_integer(3.0) and not is_integer("3")


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "4", None])
def test_require_int_names_the_argument_the_value_and_the_bound(value):
    with pytest.raises(ValueError, match=rf"^batch_size={value!r} is invalid; allowed: an integer >= 1$"):
        require_int("batch_size", value)


def test_require_int_takes_a_minimum_none_where_optional_and_a_place():
    require_int("seed", 0, minimum=0)
    require_int("max_length", None, optional=True)
    with pytest.raises(ValueError, match=r"^DeepSpeed config: gradient_accumulation_steps=0 is invalid; "
                                         r"allowed: None or an integer >= 1$"):
        require_int("gradient_accumulation_steps", 0, optional=True, where="DeepSpeed config: ")


@pytest.mark.parametrize(("value", "ok"), [(0.5, True), (1.0, False), (0.0, True), (-0.1, False), (math.nan, False),
                                           (math.inf, False), (True, False)])
def test_require_real_checks_the_interval_ends_and_finiteness(value, ok):
    def check():
        require_real("lora_dropout", value, low=0.0, high=1.0, low_open=False, high_open=True)

    if ok:
        check()
    else:
        with pytest.raises(ValueError, match=r"lora_dropout=.* is invalid; allowed: a finite number in \[0\.0, 1\.0\)"):
            check()


def test_require_choice_lists_the_choices_and_require_names_the_rule():
    with pytest.raises(ValueError, match=r"^gate='step' is invalid; allowed: one of 'rational', 'hard'$"):
        require_choice("gate", "step", ("rational", "hard"))
    require(True, "k", 3, "anything")
    with pytest.raises(ValueError, match=r"^folora config: k=3 is invalid; allowed: null with variant B$"):
        require(False, "k", 3, "null with variant B", where="folora config: ")
