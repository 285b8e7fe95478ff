"""recipes.lock: the sha256 of every recipe's canonical resolved form, and its check.

A recipe edited, or a schema default changed, without `lvr lock` makes `lvr lock --check`
fail, so every run can be traced to the exact settings it used.
"""

from __future__ import annotations

import json
from pathlib import Path

from lvr_cli.recipes import SCHEMA_VERSION, RecipeError, load_recipe, recipe_hash

LOCK_FILE = "recipes.lock"


def recipe_files(root: Path) -> list[Path]:
    """Every recipe under `root/recipes` (TOML files with a `stage` key), sorted."""
    files = []
    for p in sorted((root / "recipes").rglob("*.toml")):
        if "stage" in p.read_text():
            files.append(p)
    return files


def compute(root: Path) -> dict:
    entries = {}
    for p in recipe_files(root):
        rel = p.relative_to(root).as_posix()
        recipe = load_recipe(p)
        entries[rel] = {"stage": recipe.stage, "sha256": recipe_hash(recipe)}
    return {"schema_version": SCHEMA_VERSION, "recipes": entries}


def write(root: Path) -> dict:
    data = compute(root)
    (root / LOCK_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def check(root: Path) -> list[str]:
    """Return one line per difference between recipes.lock and the recipes (empty: in sync)."""
    lock_path = root / LOCK_FILE
    if not lock_path.exists():
        return [f"{LOCK_FILE} is missing: run `lvr lock`"]
    try:
        old = json.loads(lock_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{LOCK_FILE} is not valid JSON ({e})"]
    try:
        new = compute(root)
    except RecipeError as e:
        return [str(e)]
    problems = []
    if old.get("schema_version") != new["schema_version"]:
        problems.append(f"schema_version {old.get('schema_version')} != {new['schema_version']}: run `lvr lock`")
    old_r, new_r = old.get("recipes", {}), new["recipes"]
    for name in sorted(set(old_r) | set(new_r)):
        if name not in new_r:
            problems.append(f"{name}: locked but no longer exists")
        elif name not in old_r:
            problems.append(f"{name}: not locked")
        elif old_r[name] != new_r[name]:
            problems.append(f"{name}: resolved recipe changed since it was locked")
    return problems
