"""Every method's tuning space (``Method.search_space``) is small, valid and starts at the default."""
import itertools

import pytest

from equimodal.methods import available_methods, build_method, method_options
from equimodal.methods._registry import method_class


@pytest.mark.parametrize("name", list(available_methods()))
def test_search_space_is_at_most_four_buildable_settings_starting_at_the_default(name):
    space = method_class(name).search_space
    if not space:
        return  # tuned over the learning rate, like the baseline
    defaults = method_options(name)
    assert set(space) <= set(defaults), f"{name}: unknown options {set(space) - set(defaults)}"
    combos = list(itertools.product(*space.values()))
    assert 2 <= len(combos) <= 4
    assert all(space[k][0] == defaults[k] for k in space), f"{name}: the first value of each option is its default"
    for combo in combos:
        build_method(name, **dict(zip(space, combo)))  # every setting is a valid configuration
