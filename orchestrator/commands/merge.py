"""`mergesearch merge`: materialize a recipe JSON or a mergekit YAML into a Hugging Face model folder."""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cli import app, console, err, user_errors
from workers.hub import ModelNotFoundError, locate_model
from workers.materialize import write_merged
from workers.mergekit_config import recipe_from_mergekit
from workers.recipe import Recipe, RecipeError
from workers.sources import Sources

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count; decimal units as Hugging Face's max_shard_size."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in SIZE_UNITS or float(match[1]) <= 0:
        raise ValueError(f"--shard-size '{text}': expected a positive size such as 2GB, 500MB or 1GiB")
    return int(float(match[1]) * SIZE_UNITS[unit])


def load_merge_config(path: Path) -> tuple[Recipe, dict[str, Path]]:
    """A mergekit YAML (.yml/.yaml) or a recipe JSON with a `sources` mapping (name → folder relative to the
    file, or Hub id), as a recipe and its model folders."""
    if path.suffix.lower() in (".yml", ".yaml"):
        return recipe_from_mergekit(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise RecipeError(
            f"{path}: a recipe JSON for merge needs a 'sources' mapping of model name to folder"
        )
    try:
        folders = {name: locate_model(str(ref), path.parent) for name, ref in data.pop("sources").items()}
    except ModelNotFoundError as exc:
        raise RecipeError(f"{path}: sources: {exc}") from None
    recipe = Recipe.parse(data)
    for name in (recipe.models.base, *recipe.models.experts):
        if name not in folders:
            raise RecipeError(f"{path}: sources has no folder for model '{name}'")
    return recipe, folders


@app.command()
@user_errors
def merge(
    config: Annotated[Path, typer.Argument(help="A recipe JSON with `sources`, or a mergekit YAML.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the merged model to (new or empty).")],
    device: Annotated[Device, typer.Option(help="Where to compute the merge.")] = Device.cpu,
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Largest safetensors shard, e.g. 2GB.")
    ] = "2GB",
) -> None:
    """Merge the models of a recipe or mergekit config into a Hugging Face folder, tensor by tensor."""
    shard_bytes = parse_size(shard_size)
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder")
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    recipe, folders = load_merge_config(config)
    experts = {name: folders[name] for name in recipe.models.experts}
    sources = Sources(folders[recipe.models.base], experts, recipe.models.base)
    start = time.perf_counter()
    columns = (
        TextColumn("merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("merge", total=None)
        folder = write_merged(
            recipe,
            sources,
            out,
            shard_size=shard_bytes,
            device=device.value,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(
        f"wrote {folder} ({recipe.summary()}) in {time.perf_counter() - start:.1f} s", highlight=False
    )
