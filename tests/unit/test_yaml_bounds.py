"""The safe YAML loader's two bounds at their edges: 100 aliases load, 101 are refused; 100,000 values
(every alias expanded) load, 100,001 are refused.

``test_bounded_inputs.py`` shows that an alias bomb is refused, but its bomb trips the value bound long
before the alias bound and far past 100,000 values, so either bound could be raised or dropped unseen.
The expected counts here come from PyYAML's own unbounded ``safe_load`` of the same text (each shared
list counted every time it is reached), not from kscale's counter.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kscale.spec import MAX_YAML_ALIASES, MAX_YAML_NODES, SpecError, load_spec, parse_yaml


def _values(obj: Any) -> int:
    """Values of a loaded document, aliases expanded: every list, dict, key and scalar counts once."""
    if isinstance(obj, list):
        return 1 + sum(_values(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(_values(k) + _values(v) for k, v in obj.items())
    return 1


def _aliases(n: int) -> str:
    return "a: &a 1\nb: [" + ", ".join(["*a"] * n) + "]\n"


def _shared_list(copies: int, length: int, extra: int = 0) -> str:
    """A root list holding one anchored list of ``length`` scalars, ``copies`` aliases of it and ``extra``
    more scalars: 1 + (copies + 1) * (length + 1) + extra values."""
    anchored = "&x [" + ", ".join(["0"] * length) + "]"
    return "[" + ", ".join([anchored] + ["*x"] * copies + ["0"] * extra) + "]\n"


def test_the_bounds_are_the_documented_ones():
    assert (MAX_YAML_ALIASES, MAX_YAML_NODES) == (100, 100_000)


def test_one_hundred_aliases_load_and_one_more_is_refused():
    text = _aliases(100)
    assert parse_yaml(text) == yaml.safe_load(text) == {"a": 1, "b": [1] * 100}
    with pytest.raises(ValueError, match=r"^more than 100 aliases"):
        parse_yaml(_aliases(101))


@pytest.mark.parametrize("extra", [0, 1], ids=["100000", "100001"])
def test_one_hundred_thousand_values_load_and_one_more_is_refused(extra):
    text = _shared_list(copies=40, length=2438, extra=extra)  # 1 + 41 * 2439 = 100,000 values, + extra
    reference = yaml.safe_load(text)
    assert _values(reference) == 100_000 + extra
    assert text.count("*x") <= MAX_YAML_ALIASES  # the value bound decides, not the alias bound
    if extra == 0:
        assert parse_yaml(text) == reference
    else:
        with pytest.raises(ValueError, match=r"^more than 100000 values once aliases are expanded"):
            parse_yaml(text)


def test_load_spec_reports_the_alias_bound_as_refused_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: extract\n" + _aliases(101))
    with pytest.raises(SpecError, match="refused YAML.*more than 100 aliases"):
        load_spec(path, check_model=False)
