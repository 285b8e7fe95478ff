"""The `lvr` command: one short function per command; the work lives in `stages/`.

Heavy imports (torch, transformers) happen inside the commands so `lvr --help` is instant.
Exit codes: 0 done, 1 failed, 2 bad usage or recipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lvr: long-video reasoning: data pipeline, CoT-SFT, GRPO with MR-SP, eval, benchmarks.")

RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="dotted.key=value overrides (TOML literals)")]
AllowFailures = Annotated[bool, typer.Option("--allow-failures", help="exit 0 even when some inputs failed")]
RetryFailed = Annotated[bool, typer.Option("--retry-failed", help="reopen a finished run and redo only its "
                                           "failed (and unfinished) inputs, keeping what it finished")]


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit (2: bad usage or recipe); a message of several lines
    (an exception's) is joined into one."""
    typer.echo("error: " + " ".join(part.strip() for part in str(message).splitlines() if part.strip()), err=True)
    raise typer.Exit(code)


def load(path: Path, overrides: list[str] | None, stage: str | None = None, check_inputs: bool = True):
    from lvr_cli.recipes import RecipeError, check_paths, load_recipe

    try:
        recipe = load_recipe(path, overrides or [], stage=stage)
        if check_inputs:
            check_paths(recipe)
    except RecipeError as e:
        fail(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e))
    return recipe


def run_stage(stage: str, stage_run, path: Path, overrides: list[str] | None,
              allow_failures: bool = False, retry_failed: bool = False) -> dict:
    """Validate, open the run directory, run `stage_run(recipe, rundir)` (a stage module's
    `run`), summarise."""
    from lvr_cli.recipes import RecipeError, default_output_dir
    from lvr_cli.rundir import RunDir, print_summary

    recipe = load(path, overrides, stage)
    if relaunch_needed(recipe):
        raise typer.Exit(relaunch(recipe))
    try:
        run = RunDir(default_output_dir(recipe, path), recipe).open(retry_failed=retry_failed)
    except RecipeError as e:
        fail(str(e))
    from stages.backends.base import BackendError
    from stages.evalkit.items import EmptyEvalSetError
    from stages.mrsp.checkpoint import CheckpointError
    from stages.mrsp.dist import CollectiveError
    from stages.setup import InputError

    try:
        summary = stage_run(recipe, run)
    except (EmptyEvalSetError, InputError) as e:  # a recipe value the stage cannot use, refused before any work
        run.discard()
        fail(f"{path}: {e}")
    except CheckpointError as e:  # the run's checkpoint cannot be resumed from (nothing in it was executed)
        fail(f"cannot resume: {e}", 1)
    except BackendError as e:  # a backend the recipe describes cannot be built (bad key, URL, ...)
        fail(f"{path}: {e}")
    except CollectiveError as e:  # another process of the launch died or hung
        fail(f"{path}: {e}", 1)
    summary = run.finish(summary)
    print_summary(f"lvr {stage}: {run.path}", summary)
    if summary.get("failed", 0) and not allow_failures:
        typer.echo(f"{summary['failed']} input(s) failed: see {run.path / 'errors.jsonl'} "
                   "(--allow-failures to exit 0)", err=True)
        raise typer.Exit(1)
    hub = getattr(recipe, "hub", None)
    if hub is not None and hub.push and run.is_main:
        push_and_report(run.path, hub.repo_id, hub.private, code=1)
    return summary


def push_and_report(run_dir: Path, repo_id: str, private: bool, dry_run: bool = False, out: Path | None = None,
                    include_videos: bool = False, code: int = 2, eval_runs: list[Path] = ()) -> None:
    """Push a run (or stage it, on a dry run) and say what happened in one line."""
    from lvr_cli.hub import PushError, push_run

    try:
        r = push_run(run_dir, repo_id, private, dry_run, out, include_videos, eval_runs)
    except ValueError as e:  # a run that cannot be pushed (`code` 1 after a stage, whose run is done)
        fail(str(e), code)
    except PushError as e:
        fail(str(e), 1)
    what = f"{len(r.staged.files)} files for {r.staged.repo_type} repo {repo_id}"
    if r.dry_run_reason:
        typer.echo(f"dry run ({r.dry_run_reason}): staged {what} in {r.staged.folder}; nothing uploaded")
    else:
        typer.echo(f"pushed {what}: {r.commit_url}")


def relaunch_needed(recipe) -> bool:
    """True when the recipe asks for several processes and we are not already one of them."""
    import os

    return recipe.world_size() > 1 and "LOCAL_RANK" not in os.environ


def relaunch(recipe) -> int:
    """Run this same command under `torch.distributed.run` with the recipe's process count."""
    import os
    import subprocess

    from stages.mrsp.dist import free_port

    launch = recipe.launch
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.nproc_per_node}",
           f"--nnodes={launch.nnodes}", f"--master_port={os.environ.get('MASTER_PORT', port)}",
           "--module", "lvr_cli.main", *sys.argv[1:]]
    if launch.nnodes > 1:
        typer.echo("launch.nnodes > 1: run `torchrun` yourself on every node (see README)", err=True)
        return 2
    return subprocess.call(cmd)


@app.command()
def caption(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False,
            retry_failed: RetryFailed = False) -> None:
    """Cut videos into clips and caption each clip with a VLM backend -> captions.jsonl."""
    from stages import caption as stage

    run_stage("caption", stage.run, recipe, overrides, allow_failures, retry_failed)


@app.command("generate-qa")
def generate_qa(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False,
                retry_failed: RetryFailed = False) -> None:
    """Write question/reasoning/answer items per category from a video's captions -> qa.jsonl."""
    from stages import generate_qa as stage

    run_stage("generate-qa", stage.run, recipe, overrides, allow_failures, retry_failed)


@app.command("filter")
def filter_(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False,
            retry_failed: RetryFailed = False) -> None:
    """GRPO-aware filtering: N samples of the base model per item -> rl.jsonl and sft.jsonl."""
    from stages import filter as stage

    run_stage("filter", stage.run, recipe, overrides, allow_failures, retry_failed)


@app.command()
def sft(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False) -> None:
    """CoT supervised fine-tuning on <think>/<answer> targets (sequence parallel, DeepSpeed)."""
    from stages import sft as stage

    run_stage("sft", stage.run, recipe, overrides, allow_failures)


@app.command()
def rl(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False) -> None:
    """GRPO on long videos with the MR-SP runtime."""
    from stages import rl as stage

    run_stage("rl", stage.run, recipe, overrides, allow_failures)


@app.command("eval")
def eval_(recipe: RecipeArg, overrides: OverridesArg = None, allow_failures: AllowFailures = False) -> None:
    """Accuracy per reasoning category (LongVideo-Reason) or per duration (VideoMME)."""
    from stages import eval as stage

    run_stage("eval", stage.run, recipe, overrides, allow_failures)


@app.command("bench-mrsp")
def bench_mrsp(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Seconds per RL step and peak memory: vanilla vs peer vs MR-SP, per frame count."""
    from stages import bench_mrsp as stage

    run_stage("bench-mrsp", stage.run, recipe, overrides)


@app.command("bench-components")
def bench_components(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Per-rank time and memory of the sharded vision encode and the SP forward at SP 1, 2, 4, ..."""
    from stages import bench_components as stage

    run_stage("bench-components", stage.run, recipe, overrides)


@app.command()
def compare(run_dirs: Annotated[list[Path], typer.Argument(help="finished eval run directories, the first the baseline",
                                                          show_default=False)],
            out: Annotated[Optional[Path], typer.Option(help="output folder (default runs/compare/<A>-vs-<B>)")] = None,
            scoring: Annotated[str, typer.Option(help="lenient (lvr eval's `accuracy`) or strict (the official "
                                                      "exact match) for the per-group and bar-chart numbers")] = "lenient",
            ) -> None:
    """Compare eval runs on the same items: accuracies with 95% intervals, paired differences, McNemar tests."""
    from stages.compare import CompareError, compare_runs

    try:
        result = compare_runs(run_dirs, out, scoring)
    except CompareError as e:
        fail(str(e))
    typer.echo(f"wrote {result['markdown']} and {result['plot']}")


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe without running it; print the resolved recipe and its hash."""
    from lvr_cli.recipes import recipe_hash, resolved

    r = load(recipe, overrides)
    typer.echo(json.dumps(resolved(r), indent=2))
    typer.echo(f"# {recipe}: valid {r.stage} recipe, sha256 {recipe_hash(r)}", err=True)


@app.command()
def lock(check: Annotated[bool, typer.Option("--check", help="fail if recipes.lock is out of date")] = False,
         root: Annotated[Path, typer.Option(help="project root")] = Path(".")) -> None:
    """Write recipes.lock (the hash of every recipe's resolved form), or check it."""
    from lvr_cli import lock as lockmod
    from lvr_cli.recipes import RecipeError

    if check:
        problems = lockmod.check(root)
        for p in problems:
            typer.echo(f"recipes.lock: {p}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo("recipes.lock is up to date")
        return
    try:
        data = lockmod.write(root)
    except RecipeError as e:
        fail(str(e))
    typer.echo(f"locked {len(data['recipes'])} recipes in {root / lockmod.LOCK_FILE}")


@app.command()
def synth(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Generate synthetic long videos with exact ground truth in all four categories."""
    from stages import synth as stage

    run_stage("synth", stage.run, recipe, overrides)


@app.command()
def push(run_dir: Annotated[Path, typer.Argument(help="a finished run directory", show_default=False)],
         repo_id: Annotated[str, typer.Option("--repo-id", help="ORG/NAME on the Hugging Face Hub", show_default=False)],
         dry_run: Annotated[bool, typer.Option("--dry-run", help="stage the folder, upload nothing")] = False,
         private: Annotated[bool, typer.Option("--private/--public", help="visibility of a new repo")] = True,
         out: Annotated[Optional[Path], typer.Option(help="staging folder (default RUN_DIR/push)")] = None,
         include_videos: Annotated[bool, typer.Option("--include-videos", help="datasets: add the videos")] = False,
         eval_run: Annotated[Optional[list[Path]], typer.Option(
             "--eval-run", help="models: an eval run of RUN_DIR's final/ or a checkpoint (repeatable); the latest "
             "of final/ per dataset goes into the card's model-index", show_default=False)] = None,
         ) -> None:
    """Upload a run to the Hub with a card: a model (sft, rl) or a dataset (data stages, eval)."""
    push_and_report(run_dir, repo_id, private, dry_run, out, include_videos, eval_runs=eval_run or [])


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="an sft or rl run directory", show_default=False)]) -> None:
    """Re-draw a training run's curves PNG (SFT loss, RL rewards) from its metrics.jsonl."""
    from stages.plots import plot_run

    try:
        typer.echo(f"wrote {plot_run(run_dir)}")
    except ValueError as e:
        fail(str(e))


@app.command()
def version() -> None:
    """Print the lvr version."""
    import importlib.metadata as md

    typer.echo(f"lvr {md.version('lvr')}")


@app.command()
def env() -> None:
    """Print versions, git commit and devices as JSON."""
    from stages.env import environment

    typer.echo(json.dumps(environment(), indent=2))


def main() -> None:  # pragma: no cover - console entry for `python -m lvr_cli.main`
    app()


if __name__ == "__main__":
    sys.exit(main())
