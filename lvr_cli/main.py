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


@app.callback()
def options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="let libraries print to the console "
                                                  "(else to the run's run.log), tracebacks included")] = False) -> None:
    """lvr: long-video reasoning: data pipeline, CoT-SFT, GRPO with MR-SP, eval, benchmarks."""
    import os

    if verbose:
        os.environ["LVR_VERBOSE"] = "1"  # read by the run's log (lvr_cli/logs.py) and by relaunched ranks


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit (2: bad usage or recipe); a message of several lines
    (an exception's) is joined into one."""
    typer.echo("error: " + " ".join(part.strip() for part in str(message).splitlines() if part.strip()), err=True)
    raise typer.Exit(code)


def load(path: Path, overrides: list[str] | None, stage: str | None = None, check_inputs: bool = True):
    from lvr_cli.recipes import RecipeError, check_paths, load_recipe
    from lvr_cli.tracking import check_installed

    try:
        recipe = load_recipe(path, overrides or [], stage=stage)
        if check_inputs:
            check_paths(recipe)
            check_installed(recipe.log)
    except RecipeError as e:
        fail(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e))
    return recipe


def run_stage(stage: str, stage_run, path: Path, overrides: list[str] | None,
              allow_failures: bool = False, retry_failed: bool = False) -> dict:
    """Validate, open the run directory, run `stage_run(recipe, rundir)` (a stage module's
    `run`), summarise."""
    from lvr_cli.logs import RunLog, verbose
    from lvr_cli.recipes import RecipeError, default_output_dir
    from lvr_cli.rundir import RunDir, print_summary
    from stages.shards import launch_shard, shard_dir

    recipe = load(path, overrides, stage)
    share = launch_shard(recipe)  # caption, generate-qa under torchrun/srun: this process's shard, its own run
    if share:
        recipe = load(path, [*(overrides or []), f"data.shard={share}"], stage)
    from lvr_cli.launch import relaunch, relaunch_needed

    try:
        needed = relaunch_needed(recipe)
    except ValueError as e:
        fail(f"{path}: {e}")
    if needed:
        raise typer.Exit(relaunch(recipe))
    try:
        out = shard_dir(default_output_dir(recipe, path), getattr(getattr(recipe, "data", None), "shard", None))
        run = RunDir(out, recipe, rank=0 if share else None).open(retry_failed=retry_failed)
    except RecipeError as e:
        fail(str(e))
    from stages.backends.base import BackendError
    from stages.evalkit.items import EmptyEvalSetError
    from stages.mrsp.checkpoint import CheckpointError
    from stages.mrsp.dist import CollectiveError
    from stages.setup import InputError

    log = RunLog(run.path, run.rank, verbose()).start()  # library output -> run.log
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
    except Exception as e:  # a bug or a broken environment: the traceback to the log file, one line here
        run.close(failed=True)
        fail(log.crash(e), 1)
    finally:
        log.stop()
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
def merge(targets: Annotated[list[str], typer.Argument(
              metavar="TARGETS", show_default=False,
              help="a recipe and its dotted.key=value overrides: merge <output dir>/shard-i-of-N into "
                   "<output dir>; or the folder to merge into and the shard directories")],
          allow_failures: AllowFailures = False) -> None:
    """Join the finished shards (data.shard = "i/N") of caption, generate-qa or filter into one run, in input order."""
    from pydantic import ValidationError

    from lvr_cli.recipes import STAGES, default_output_dir, recipe_hash, resolved
    from lvr_cli.rundir import print_summary
    from stages import shards
    from stages.env import environment

    recipe = None
    if targets[0].endswith(".toml"):  # the recipe's output dir holds the shards and gets the merge
        recipe = load(Path(targets[0]), targets[1:])
        out = default_output_dir(recipe, targets[0])
        dirs = shards.find_shards(out) or fail(f"{out}: no shard directories (shard-i-of-N) to merge")
    elif len(targets) < 2:
        fail("merge: give a recipe, or an output folder and the shard directories")
    else:
        out, dirs = Path(targets[0]), [Path(t) for t in targets[1:]]
    try:
        runs = shards.read_shards(dirs, (targets[0], resolved(recipe)) if recipe is not None else None)
        data = shards.merged_recipe(runs, recipe.output.dir if recipe is not None else str(out))
        merged = STAGES[data["stage"]].model_validate(data)
        shards.check_target(out, runs)
        summary = shards.merge(out, runs, shards.plan_for(merged))
    except shards.MergeError as e:
        fail(str(e))
    except ValidationError as e:
        fail(f"{runs[0].path / 'recipe.json'}: not a valid {data['stage']} recipe of this lvr "
             f"({e.error_count()} error(s)); rerun the shards")
    (out / "recipe.json").write_text(json.dumps(data, indent=2) + "\n")
    env = environment() | {"recipe_sha256": recipe_hash(merged), "merged_from": [str(r.path) for r in runs]}
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    shards.write_summary(out, summary)  # last: a merge killed before it is unfinished, and merged again
    print_summary(f"lvr merge: {out} ({len(runs)} shards)", summary)
    if summary.get("failed", 0) and not allow_failures:
        typer.echo(f"{summary['failed']} input(s) failed: see {out / 'errors.jsonl'} (--allow-failures to exit 0)",
                   err=True)
        raise typer.Exit(1)


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
def plan(recipe: RecipeArg, overrides: OverridesArg = None,
         gpu: Annotated[Optional[list[str]], typer.Option(
             "--gpu", help="a100-80g, h100-80g, h200 or cpu-24g (repeatable)")] = None,
         model: Annotated[Optional[str], typer.Option(
             "--model", help="plan with this hub id's or folder's config instead of model.path "
             "(e.g. an SFT checkpoint not trained yet)", show_default=False)] = None,
         against: Annotated[Optional[Path], typer.Option(
             "--against", help="a bench-mrsp JSON (benchmarks/<name>.json): predicted vs measured per rank",
             show_default=False)] = None,
         ) -> None:
    """Memory per rank (weights, gradients, optimizer, activations, KV cache, embeddings) and the
    largest frame count that fits, for MR-SP and the vanilla way (sft, rl, bench-mrsp recipes)."""
    from stages.plan_model import PlanError
    from stages.plan_report import report

    r = load(recipe, overrides, check_inputs=False)
    try:
        text = report(r, str(recipe), gpu or ["h100-80g"], model, against)
    except PlanError as e:
        fail(f"{recipe}: {e}")
    typer.echo(text)


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
