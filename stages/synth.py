"""`lvr synth`: synthetic long videos with exact ground truth (the embedded default data).

Writes `videos/*.mp4`, `captions_ref.jsonl` (reference clip captions), `train.jsonl` and
`eval.jsonl` (LongVideo-Reason records in the four categories) into the run directory.
Generation is deterministic in the recipe's seed, so a re-run rewrites identical files.
"""

from __future__ import annotations


def run(recipe, rundir) -> dict:
    from stages.data.synth import generate

    summary = generate(recipe.synth, rundir.path, seed=recipe.seed)
    return {"output": str(rundir.path), **summary}
