"""The fast check of plain JSON (once per answer) agrees with the one that names the part."""

from __future__ import annotations

import collections
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from batcher import fastjson
from batcher.fastjson import _first_unsendable, _plain

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text()
           | st.sampled_from(["\ud800", "a\udfffb", "é", "日本"]))
keys = st.text(max_size=5) | st.sampled_from(["\ud800", 1, None, 2.5])
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(keys, inner, max_size=4)),  # type: ignore[arg-type]
    max_leaves=20,
)


@given(values)
def test_the_fast_check_agrees_with_the_naming_one(value: Any) -> None:
    assert _plain(value) == (_first_unsendable(value, "") is None)
    assert fastjson.unsendable(value) == _first_unsendable(value, "")


def test_subclasses_and_other_types_get_the_naming_check() -> None:
    class Text(str):
        pass

    ordered = collections.OrderedDict(a=1)
    assert fastjson.unsendable({"a": Text("x"), "b": ordered, "c": True}) is None
    assert fastjson.unsendable({"a": [1, {"b": object()}]}) == (
        "a[1].b", "is a object, not a JSON value (quote dates and times)")
    assert fastjson.unsendable({"a": {"b": math.inf}}) == ("a.b", "is not a finite number")
    assert fastjson.unsendable([2**63]) == ("[0]", "is an integer beyond 64 bits")
    assert fastjson.unsendable(-(2**63)) is None
