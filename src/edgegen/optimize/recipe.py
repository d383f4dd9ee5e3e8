"""`edgegen optimize RECIPE.toml`: the recipe, typed; every mistake is one clear line.

Two tasks, told apart by `task`. The digits task (the seed's MLPs):

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

The lm task (a GGUF language model; every step starts again from the reference):

    task = "lm"
    base = "smollm2-135m"     # a pullable model, or the path of a GGUF file
    reference = "F16"         # the least-compressed variant every delta is measured against
    [[steps]]
    kind = "quantize"         # quantize | drop-layers
    type = "Q4_K_M"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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
    """cluster: each layer's weights take `clusters` shared values; tie: same-shaped layers share a matrix."""

    kind: Literal["share"]
    method: Literal["cluster", "tie"] = "cluster"
    clusters: int = Field(16, ge=2, le=65536, description="cluster: shared values per layer")
    finetune_epochs: int = Field(0, ge=0, le=10_000, description="tie: training of the tied model")

    @model_validator(mode="after")
    def _fits(self) -> Share:
        if self.method == "cluster" and self.finetune_epochs:
            raise ValueError("fine-tuning would undo clustering; finetune_epochs is for method = tie")
        return self


class Quantize(_Step):
    kind: Literal["quantize"]
    mode: Literal["dynamic", "static", "qat"]
    calibration_samples: int = Field(256, ge=1)
    epochs: int = Field(5, ge=1, le=10_000, description="qat: fine-tuning epochs through int8 rounding")


Step = Annotated[Distill | Prune | LowRank | Share | Quantize, Field(discriminator="kind")]


class Teacher(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: Annotated[list[Annotated[int, Field(ge=1, le=65536)]], Field(min_length=1)] = [1200, 1200]
    epochs: int = Field(40, ge=1, le=10_000)


class DigitsRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["digits"]
    seed: int = 0
    teacher: Teacher = Field(default_factory=Teacher)
    steps: Annotated[list[Step], Field(min_length=1)]
    latency_runs: int = Field(200, ge=10, le=100_000, description="timed runs per latency figure")
    engines: bool = Field(True, description="time the final float model on every engine that installs here")
    tflite: bool = Field(True, description="also write a TFLite package of each float step (LiteRT timed)")


# The GGUF file types llama.cpp's quantizer writes without an importance matrix (see optimize/lm.py).
GgufType = Literal[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
]  # fmt: skip
GGUF_TYPES: tuple[str, ...] = get_args(GgufType)


class GgufQuantize(_Step):
    kind: Literal["quantize"]
    type: GgufType


class DropLayers(_Step):
    """Depth pruning: drop whole transformer blocks, named or chosen by measured sensitivity."""

    kind: Literal["drop-layers"]
    count: int | None = Field(None, ge=1, description="drop the blocks whose removal costs least perplexity")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    type: GgufType = "Q8_0"

    @model_validator(mode="after")
    def _one(self) -> DropLayers:
        if (self.count is None) == (self.layers is None):
            raise ValueError("give exactly one of count or layers")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be distinct")
        return self


LmStep = Annotated[GgufQuantize | DropLayers, Field(discriminator="kind")]


class LmEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ctx: int = Field(512, ge=64, le=8192, description="tokens per perplexity chunk")
    chunks: int = Field(8, ge=1, le=1000, description="perplexity chunks (the second half of each is scored)")
    sensitivity_chunks: int = Field(1, ge=1, le=1000, description="chunks per block in the sensitivity scan")
    decode_tokens: int = Field(64, ge=2, le=4096, description="greedy tokens per decode-speed run")
    decode_runs: int = Field(3, ge=1, le=100)
    threads: int = Field(0, ge=0, le=256, description="llama.cpp threads; 0: one per core")


class LmRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["lm"]
    base: str = Field("smollm2-135m", min_length=1, description="a pullable model or a GGUF file's path")
    reference: GgufType = "F16"
    eval: LmEval = Field(default_factory=LmEval)
    steps: Annotated[list[LmStep], Field(min_length=1)]


Recipe = Annotated[DigitsRecipe | LmRecipe, Field(discriminator="task")]
_RECIPE: TypeAdapter[DigitsRecipe | LmRecipe] = TypeAdapter(Recipe)


def load_recipe(path: Path) -> DigitsRecipe | LmRecipe:
    data = read_toml(path, "recipe")
    try:
        return _RECIPE.validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        # The first part of a location is the task the recipe was read as; the rest says where.
        where = ".".join(str(p) for p in error["loc"][1:]) or "task"
        raise ConfigError(f"recipe {path.name}: {where}: {error['msg']}") from None
