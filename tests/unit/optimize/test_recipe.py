from __future__ import annotations

from pathlib import Path

import pytest

from edgegen.errors import ConfigError
from edgegen.optimize.recipe import Distill, LowRank, Prune, Quantize, load_recipe

GOOD = """
task = "digits"
[teacher]
hidden = [32]
epochs = 2
[[steps]]
kind = "distill"
hidden = [16]
[[steps]]
kind = "prune"
amount = 0.5
[[steps]]
kind = "lowrank"
rank = 4
[[steps]]
kind = "quantize"
mode = "static"
"""


def test_a_recipe_reads_into_typed_steps(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert [type(s) for s in recipe.steps] == [Distill, Prune, LowRank, Quantize]
    assert recipe.teacher.hidden == [32]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('kind = "prune"', 'kind = "melt"'), "steps.1"),
        (GOOD.replace("amount = 0.5", ""), "amount"),
        (GOOD.replace("amount = 0.5", "amount = 1.0"), "amount"),
        (GOOD.replace("amount = 0.5", "amount = -0.2"), "amount"),
        (GOOD.replace("rank = 4", "rank = 4\nenergy = 0.9"), "exactly one of rank or energy"),
        (GOOD.replace('mode = "static"', 'mode = "int3"'), "mode"),
        (GOOD.replace('task = "digits"', 'task = "imagenet"'), "task"),
        (GOOD + "\nsurprise = 1\n", "surprise"),
        ("task = ", "not valid TOML"),
    ],
)
def test_bad_recipes_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_recipe(path)
    assert "\n" not in caught.value.message


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")
