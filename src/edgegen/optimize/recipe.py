"""`edgegen optimize RECIPE.toml`: the recipe, typed; every mistake is one clear line.

    task = "digits"
    seed = 0
    [teacher]
    hidden = [1200, 1200]
    epochs = 40
    [[steps]]
    kind = "distill"          # distill | prune | lowrank | share | quantize
    hidden = [800, 800]
    ...

Steps run in order on the current float model; `quantize` writes an int8 package of the current model
without replacing it, so several quantization modes can stand side by side at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgegen.config import read_toml
from edgegen.errors import ConfigError


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distill(_Step):
    kind: Literal["distill"]
    hidden: Annotated[list[Annotated[int, Field(ge=1, le=65536)]], Field(min_length=1)] = [800, 800]
    epochs: int = Field(40, ge=1, le=10_000)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term")


class Prune(_Step):
    kind: Literal["prune"]
    method: Literal["neurons", "l1", "random"] = "neurons"
    amount: float = Field(ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"
    finetune_epochs: int = Field(0, ge=0, le=10_000)


class LowRank(_Step):
    kind: Literal["lowrank"]
    rank: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    finetune_epochs: int = Field(0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _one(self) -> LowRank:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self


class Share(_Step):
    kind: Literal["share"]
    clusters: int = Field(16, ge=2, le=65536, description="shared values per layer")


class Quantize(_Step):
    kind: Literal["quantize"]
    mode: Literal["dynamic", "static"]
    calibration_samples: int = Field(256, ge=1)


Step = Annotated[Distill | Prune | LowRank | Share | Quantize, Field(discriminator="kind")]


class Teacher(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: Annotated[list[Annotated[int, Field(ge=1, le=65536)]], Field(min_length=1)] = [1200, 1200]
    epochs: int = Field(40, ge=1, le=10_000)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["digits"]
    seed: int = 0
    teacher: Teacher = Field(default_factory=Teacher)
    steps: Annotated[list[Step], Field(min_length=1)]
    latency_runs: int = Field(200, ge=10, le=100_000, description="timed runs per latency figure")
    engines: bool = Field(True, description="time the final float model on every engine that installs here")


def load_recipe(path: Path) -> Recipe:
    data = read_toml(path, "recipe")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"recipe {path.name}: {where}: {error['msg']}") from None
