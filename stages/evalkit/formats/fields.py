"""Any other multiple-choice layout, read through `[eval.fields]`: which field holds the
question, the options, the answer, the video, the key and the groups to report by.

    [eval.fields]
    question = "q"
    options = ["a0", "a1", "a2", "a3", "a4"]   # or one field with a list/dict; left out: `A. ...` lines in the question
    answer = "answer"                          # a letter, the option's text, a 0-based index, or an option field's name
    video = "vid_name"                         # relative to data.video_dir, or a name found below it
    key = "qid"                                # left out: file:line
    groups = ["show_name"]

A field name may be a dotted path into nested objects (`meta.question`).
"""

from __future__ import annotations

from stages.data.records import RecordError, split_problem
from stages.evalkit.formats.base import NOT_AN_OPTION, EvalItem, ReadContext, answer_letter, options_dict


def get(rec: dict, path: str):
    """`rec[path]`, following dots into nested objects; raise `RecordError` naming a missing field."""
    value = rec
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise RecordError(f"missing field {path!r} (eval.fields)")
        value = value[part]
    return value


def item(rec: dict, ctx: ReadContext, where: str) -> EvalItem:
    """A record of any layout as an item, through `ctx.fields` (the recipe's `[eval.fields]`)."""
    spec = ctx.fields
    question, names = str(get(rec, spec.question)).strip(), None
    if spec.options is None:
        question, found = split_problem(question)
        if not found:
            raise RecordError(f"{spec.question}: no 'A. ...' option lines and no eval.fields.options")
        options = options_dict(found)
    elif isinstance(spec.options, str):
        options = options_dict(get(rec, spec.options))
    else:
        names = [n for n in spec.options if rec.get(n) not in NOT_AN_OPTION]
        options = options_dict([rec[n] for n in names])
    ref = get(rec, spec.video)
    groups = {g: str(rec[g]) for g in spec.groups if rec.get(g) is not None}
    key = str(get(rec, spec.key)) if spec.key else where
    return EvalItem(key, question, options, answer_letter(get(rec, spec.answer), options, names),
                    ctx.video(ref[0] if isinstance(ref, list) and ref else ref), groups, "fields")
