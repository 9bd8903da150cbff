"""The objective registry: a name gives its Objective, an unknown one a one-line usage error."""

import pytest

from finetune.errors import UsageError
from finetune.training.objectives import OBJECTIVES, get_objective
from finetune.training.objectives.base import Objective
from finetune.training.objectives.sft import SFT


def test_known_names_give_their_objective():
    assert get_objective("sft") is SFT
    assert all(issubclass(cls, Objective) and cls.name == name for name, cls in OBJECTIVES.items())


def test_unknown_name_is_a_one_line_usage_error_with_a_suggestion():
    with pytest.raises(UsageError) as e:
        get_objective("sfx")
    assert str(e.value) == "unknown training objective 'sfx' (did you mean sft?); known: sft, dpo, orpo, simpo, kto"
    assert e.value.exit_code == 2
