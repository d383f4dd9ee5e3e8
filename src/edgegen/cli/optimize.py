"""`edgegen optimize`: a recipe in, packages and a measured report out (needs the optimize extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgegen.cli.options import err, friendly
from edgegen.errors import EdgegenError


@friendly
def optimize(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML: task, teacher, ordered steps")],
    out: Annotated[Path, typer.Option("--out", help="output directory (must not exist)")] = Path("optimized"),
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            help="budget mode (digits): search the recipe's options for the fastest package that loses at "
            "most this many accuracy points against the teacher",
        ),
    ] = None,
) -> None:
    """Train, compress and export per the recipe; one package per step and a measured report."""
    try:
        from edgegen.optimize.pipeline import run
        from edgegen.optimize.recipe import load_recipe
    except ImportError:
        raise EdgegenError("optimize needs the optimize extra: pip install 'edgegen[optimize]'") from None
    parsed = load_recipe(recipe)
    with err.status("optimizing") as status:
        result = run(parsed, out, progress=status.update, max_accuracy_drop=max_accuracy_drop)
    from edgegen.optimize.report import markdown

    out_console = Console(width=200)
    out_console.print(markdown(result), markup=False, highlight=False)
    err.print(f"packages and report.md, report.json written to {out}")
