"""Recipes: TOML loading, dotted `key=value` overrides, hashes and input paths.

The schemas themselves (one per stage, with every default) live in `lvr_cli/schema.py`.
`load_recipe` returns a validated recipe or raises `RecipeError`, whose message is one
line: the file, the dotted key and the reason.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lvr_cli.schema import SCHEMA_VERSION, STAGES, Recipe, RecipeError  # noqa: F401 (SCHEMA_VERSION: lock's)

# Paths that must exist before a stage starts (checked by `check_paths`, not by `lock`).
INPUT_PATHS = {"data.input", "data.video_dir", "caption.prompt_file", "eval.input"}


# -- loading ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """Return `(dotted key parts, value)` of `key=value`, the value parsed as a TOML literal
    (a bare word that is not valid TOML is taken as a string)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override {text!r}: bad key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain TOML data
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"{'.'.join(parts)}: {p} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"] if not str(p).startswith("function-after")]
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    # Validators of a section name their own field as "field: reason".
    if ": " in msg and msg.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum() and " " not in msg.split(": ", 1)[0]:
        field, msg = msg.split(": ", 1)
        loc = loc + [field] if "." not in field else field.split(".")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{'.'.join(loc) or '<recipe>'}: {msg}{more}"


def read_toml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None


def load_recipe(path: str | Path, overrides: list[str] = (), stage: str | None = None) -> Recipe:
    """Return the validated recipe at `path` with `overrides` applied; raise `RecipeError`."""
    path = Path(path)
    data = apply_overrides(read_toml(path), list(overrides))
    name = data.get("stage", stage)
    if stage is not None and name != stage:
        raise RecipeError(f"{path}: stage: recipe is for '{name}', not '{stage}'")
    if name not in STAGES:
        raise RecipeError(f"{path}: stage: {name!r} is not one of {', '.join(STAGES)}" if name
                          else f"{path}: stage: required key is missing")
    data.setdefault("stage", name)
    try:
        recipe = STAGES[name].model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_format_error(e)}") from None
    return recipe


def resolved(recipe: Recipe) -> dict:
    """The recipe with every default filled in, as plain JSON data."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical resolved JSON (sorted keys, no whitespace)."""
    text = json.dumps(resolved(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, data


def check_paths(recipe: Recipe, base: Path = Path(".")) -> None:
    """Raise `RecipeError` naming the key when an input path of the recipe does not exist, a
    local `model.path` is not a model folder, or `qa.prompts_dir` lacks a prompt the recipe needs."""
    for key, value in _walk(resolved(recipe)):
        if key in INPUT_PATHS and value is not None:
            if any(ch in str(value) for ch in "*?[") and key == "data.input":
                continue  # a glob: resolved by the stage
            if not (base / value).exists():
                raise RecipeError(f"{key}: {value}: no such file or directory")
    model = getattr(recipe, "model", None)
    if model is not None:
        check_model_path(model.path, base)
    if recipe.stage == "generate-qa":
        from stages.generate_qa import load_templates

        if not (base / recipe.qa.prompts_dir).is_dir():
            raise RecipeError(f"qa.prompts_dir: {recipe.qa.prompts_dir}: no such folder")
        try:
            load_templates(recipe.qa)
        except FileNotFoundError as e:
            raise RecipeError(str(e)) from None


def check_model_path(path: str, base: Path = Path(".")) -> None:
    """Refuse a `model.path` that cannot name a model: an unknown `tiny:` family, a local path
    that does not exist or is not a Hugging Face model folder. A hub id (`org/name`) is left
    to the stage, which reports in one line when it cannot load it."""
    from stages.models.tiny import FAMILIES, TINY_PREFIX, family_of

    family = family_of(path)
    if family is not None:
        if family not in FAMILIES:
            raise RecipeError(f"model.path: {path!r}: no such tiny model; use one of "
                              + ", ".join(TINY_PREFIX + f for f in FAMILIES))
        return
    local = base / Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeError(f"model.path: {path}: no config.json (not a Hugging Face model folder)")
    elif local.exists():
        raise RecipeError(f"model.path: {path}: a file, not a model folder")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:  # not a hub id
        raise RecipeError(f"model.path: {path}: no such folder")


def default_output_dir(recipe: Recipe, recipe_path: str | Path) -> Path:
    return Path(recipe.output.dir) if recipe.output.dir else Path("runs") / recipe.stage / Path(recipe_path).stem
