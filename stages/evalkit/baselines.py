"""What an accuracy should be read against: the answer-letter prior of the items evaluated, and a
blind run (the same model and prompt with the video left out).

The released LongVideo-Reason eval set is skewed (always answering B scores 44.1%), so chance is
not 1/4: the report shows the accuracy of always answering each letter and of the majority gold
letter, and the distribution of predicted letters next to the gold one. A model that has
learned only the prior predicts the majority letter; one that ignores the video scores about
the same blind.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from stages.evalkit.items import EvalItem
from stages.evalkit.stats import proportion

if TYPE_CHECKING:  # the blind half needs torch and the runtime; reports and `lvr compare` do not
    from stages.mrsp.rollout import Rollout, RolloutPrompt, Sampling

UNPARSED = "unparsed"  # the predicted-letter bucket of replies that name no option


def letter_baselines(rows: list[dict]) -> dict:
    """The answer-letter prior of prediction rows: `letters` (every option letter offered),
    `gold` and `predicted` counts per letter (`predicted` also counts `unparsed`), `always`
    (per letter, the accuracy of always answering it) and `majority` (the most frequent gold
    letter, earliest on ties, with that accuracy)."""
    gold = Counter(r["answer"] for r in rows)
    predicted = Counter(r["extracted"] if r.get("extracted") is not None else UNPARSED for r in rows)
    offered = {k for r in rows for k in (r.get("options") or {})}  # rows before options were recorded: gold only
    letters = sorted(offered | set(gold) | (set(predicted) - {UNPARSED}))
    always = {letter: proportion(gold[letter], len(rows)) for letter in letters}
    out = {"letters": letters, "gold": {x: gold[x] for x in letters},
           "predicted": {x: predicted[x] for x in letters} | {UNPARSED: predicted[UNPARSED]}, "always": always}
    if letters:
        top = min(letters, key=lambda x: (-gold[x], x))
        out["majority"] = {"letter": top, **always[top]}
    return out


# -- blind: the prompt without its video ----------------------------------------------------------
def blind_messages(record: dict, system: str | None = None, think: bool = True) -> list[dict]:
    """`question_messages` of `record` with its video part removed (same system, question,
    options and instruction)."""
    from stages.mrsp.runtime import question_messages

    out = []
    for m in question_messages(record, system, think):
        if isinstance(m["content"], list):
            m = {**m, "content": [part for part in m["content"] if part.get("type") != "video"]}
        out.append(m)
    return out


def blind_prompt(adapter, record: dict, key: str, system: str | None = None, think: bool = True) -> RolloutPrompt:
    """The text-only prompt of `record`: the chat template's ids without any vision token, with
    plain 1-D positions on the three mRoPE axes (what the model uses for text alone)."""
    from stages.mrsp.rollout import RolloutPrompt

    ids = adapter.prompt_ids(blind_messages(record, system, think), [])
    return RolloutPrompt.build(adapter, key, ids, [], grids=[])


def generate_blind(rt, items: list[EvalItem], sampling: Sampling, indices: list[int]) -> list[Rollout]:
    """One reply per item from `rt`'s model and prompt settings with the video left out, through
    the same rollout engine as the video replies. `indices`: the items' places in the eval set;
    each samples with a seed of its own, so a resumed run redoes the same replies."""
    out = []
    for i, it in zip(indices, items):
        prompt = blind_prompt(rt.adapter, it.record(), it.key, rt.system, rt.think)
        seeded = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed * 7_919 + i)
        out.append(rt.engine.generate([prompt], 1, seeded)[0][0])
    return out
