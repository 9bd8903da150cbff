"""finetune.typed on a YAML mapping: the recipe's messages, list items named by their label."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from finetune.errors import UsageError
from finetune.ranges import ranged
from finetune.typed import items, parse_mapping


@dataclass
class Inner:
    k: int = ranged(1, ge=1)
    mode: Literal["a", "b"] = "a"


@dataclass
class Item:
    name: str = ""
    scale: Optional[float] = None
    inner: Inner = field(default_factory=Inner)


@dataclass
class Outer:
    seed: int = ranged(0, ge=0)
    things: list[Item] = items("thing {n}")
    others: list[Item] = field(default_factory=list)


def test_items_are_built_as_their_class_and_nulls_mean_the_default():
    o = parse_mapping(Outer, {"seed": None, "things": [{"name": "x", "inner": {"k": 3}}, {"scale": 2}]}, "f")
    assert o.seed == 0 and [t.name for t in o.things] == ["x", ""]
    assert o.things[0].inner.k == 3 and o.things[1].scale == 2.0 and o.others == []


@pytest.mark.parametrize("data, says", [
    ({"sede": 1}, "f: unknown key 'sede' (did you mean seed?)"),
    ({"seed": -1}, "f: seed must be >= 0, got -1"),
    ({"seed": True}, "f: seed: expected an integer, got 'True'"),
    ({"things": "x"}, "f: things: expected a list of mappings, got 'x'"),
    ({"things": [{}, 3]}, "f: thing 2: expected a mapping like {key: value}, got 3"),
    ({"things": [{"nmae": "x"}]}, "f: thing 1: unknown key 'nmae' (did you mean name?)"),
    ({"things": [{"inner": {"mode": "c"}}]}, "f: thing 1: inner.mode must be one of a, b, got 'c'"),
    ({"things": [{}, {"inner": {"k": 0}}]}, "f: thing 2: inner.k must be >= 1, got 0"),
    ({"things": [{"scale": "big"}]}, "f: thing 1: scale: expected null or a finite number, got 'big'"),
    ({"others": [{}, {"scale": float("nan")}]}, "f: others[1]: scale must be a finite number, got nan"),
    ({"things": [{"inner": {}, "innr": {}}]}, "f: thing 1: unknown key 'innr' (did you mean inner"),
])
def test_refusals_are_one_line_naming_file_item_and_key(data, says):
    with pytest.raises(UsageError) as e:
        parse_mapping(Outer, data, "f")
    assert says in str(e.value) and "\n" not in str(e.value)
