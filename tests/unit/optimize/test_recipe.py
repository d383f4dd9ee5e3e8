from __future__ import annotations

from pathlib import Path

import pytest

from edgegen.errors import ConfigError
from edgegen.optimize.recipe import (
    Distill,
    DropLayers,
    GgufQuantize,
    LmRecipe,
    LowRank,
    Prune,
    Quantize,
    load_recipe,
)

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
        (GOOD + '[[steps]]\nkind = "share"\nfinetune_epochs = 3\n', "finetune_epochs is for method = tie"),
        (GOOD + '[[steps]]\nkind = "share"\nmethod = "weld"\n', "method"),
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


LM = """
task = "lm"
base = "model.gguf"
[eval]
ctx = 128
[[steps]]
kind = "quantize"
type = "Q4_K_M"
[[steps]]
kind = "drop-layers"
count = 2
"""


def test_an_lm_recipe_reads_into_its_own_steps(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(LM)
    recipe = load_recipe(path)
    assert isinstance(recipe, LmRecipe)
    assert [type(s) for s in recipe.steps] == [GgufQuantize, DropLayers]
    assert recipe.reference == "F16"
    assert recipe.eval.ctx == 128
    assert recipe.steps[1].type == "Q8_0"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LM.replace('"Q4_K_M"', '"Q3_XXL"'), "steps.0.quantize.type"),
        (LM.replace("count = 2", "count = 2\nlayers = [1]"), "exactly one of count or layers"),
        (LM.replace("count = 2", "layers = [3, 3]"), "distinct"),
        (LM.replace("count = 2", "count = 0"), "count"),
        (LM.replace("ctx = 128", "ctx = 8"), "eval.ctx"),
        (LM.replace('kind = "quantize"', 'kind = "distill"'), "steps.0"),
        (LM.replace('base = "model.gguf"', 'teacher = "x"'), "teacher"),
    ],
)
def test_bad_lm_recipes_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_recipe(path)
    assert "\n" not in caught.value.message
