"""Every method's tuning space (``Method.search_space``) is valid and starts at (or holds) the default."""
import itertools

import pytest

from equimodal.methods import available_methods, build_method, method_options
from equimodal.methods._registry import method_class
from equimodal.methods._space import Choice, FloatRange, IntRange, contains, dimension


@pytest.mark.parametrize("name", list(available_methods()))
def test_search_space_is_at_most_four_buildable_settings_starting_at_the_default(name):
    space = method_class(name).search_space
    if not space:
        return  # tuned over the learning rate, like the baseline
    defaults = method_options(name)
    assert set(space) <= set(defaults), f"{name}: unknown options {set(space) - set(defaults)}"
    listed = {k: v for k, v in space.items() if isinstance(v, tuple)}  # the value-list form (--tune-grid's grid)
    combos = list(itertools.product(*listed.values()))
    if listed and len(listed) == len(space):
        assert 2 <= len(combos) <= 4
    assert all(listed[k][0] == defaults[k] for k in listed), f"{name}: the first value of each option is its default"
    for combo in combos:
        build_method(name, **dict(zip(listed, combo)))  # every setting is a valid configuration
    for key, entry in space.items():  # ranges and choices (bench --tune's Optuna search): the default inside
        dim = dimension(entry)
        assert contains(dim, defaults[key]), f"{name}: default {key}={defaults[key]!r} outside {entry!r}"
        ends = dim.values if isinstance(dim, Choice) else (dim.low, dim.high)
        for value in ends:
            build_method(name, **{key: value})


def test_a_space_declares_choices_and_ranges_and_reads_a_tuple_as_a_choice():
    assert dimension((0.8, 0.1)) == Choice(0.8, 0.1) == Choice([0.8, 0.1])
    assert contains(FloatRange(0.1, 2.0, log=True), 0.5) and not contains(FloatRange(0.1, 2.0), 3.0)
    assert contains(IntRange(1, 8), 4) and not contains(Choice("a", "b"), "c")
    with pytest.raises(ValueError):
        FloatRange(0.0, 1.0, log=True)
    with pytest.raises(TypeError):
        dimension(0.5)
