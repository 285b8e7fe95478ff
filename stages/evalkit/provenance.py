"""What a published accuracy was measured with: the model (and its revision), the lvr commit,
the date, and every setting that changes the replies (decoding, prompt, video sampling)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from stages.env import git_commit
from stages.models.tiny import family_of


def git_dirty() -> bool | None:
    """Whether lvr's tracked files differ from its commit (the commit then does not name the code
    that ran); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def hub_revision(repo_id: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit of `repo_id`'s snapshot in the local Hugging Face cache (the one a load uses
    offline), or None when it is not cached; never goes online."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


def model_identity(path: str, cache_dir: str | Path | None = None) -> dict:
    """`{"path", "source", "name", "revision"}` of a model path: `tiny` (built by lvr), `local`
    (a folder: its name, with its parent's for a run's `final/` or `checkpoint-*`; no revision)
    or `hub` (the id; revision from the local cache)."""
    if family_of(path) is not None:
        return {"path": path, "source": "tiny", "name": path, "revision": None}
    local = Path(path).expanduser()
    if local.exists():
        folder = local.resolve()
        name = folder.name
        if name == "final" or name.startswith("checkpoint-"):
            name = f"{folder.parent.name}/{name}"
        return {"path": path, "source": "local", "name": name, "revision": None}
    return {"path": path, "source": "hub", "name": path, "revision": hub_revision(path, cache_dir)}


def section(obj) -> dict:
    """A recipe section as a plain dict (pydantic sections and `SimpleNamespace`s alike)."""
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(vars(obj))


def run_provenance(recipe) -> dict:
    """Model identity, lvr git commit (and whether the checkout had uncommitted changes), date, seed and the generation, prompt, video and model
    settings of an eval recipe."""
    gen = section(recipe.generation)
    gen |= {"top_p": 1.0, "greedy": gen["temperature"] == 0}  # eval samples with top_p 1 (stages/eval.py)
    return {"model": model_identity(recipe.model.path), "git_commit": git_commit(), "git_dirty": git_dirty(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": recipe.seed, "blind": recipe.eval.blind,
            "generation": gen, "prompt": section(recipe.prompt), "video": section(recipe.video),
            "model_settings": section(recipe.model)}
