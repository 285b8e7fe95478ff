"""The shared-prompt packing and its attention, against hand-built expectations (no model)."""

import pytest
import torch
import torch.nn.functional as F

from stages.mrsp import shared
from stages.mrsp.shared import PromptGroup, pack


def _group(prompt, responses, delta=0):
    """Unshared rows `prompt + response` with 1-D-style positions (index + delta after the prompt)."""
    rows = []
    for r in responses:
        ids = torch.tensor(prompt + r)
        pos = torch.cat([torch.arange(len(prompt)), torch.arange(len(prompt), len(ids)) + delta]).expand(3, -1)
        rows.append((ids, pos))
    return PromptGroup(len(prompt), rows, [])


def test_pack_places_prompts_once_and_scores_each_response_from_its_prompt():
    groups = [_group([1, 2, 3], [[10, 11], [20], [30, 31, 32]], delta=-1), _group([4, 5], [[40, 41]])]
    batch, layout, spans = pack(groups)
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, 20, 30, 31, 32, 4, 5, 40, 41]]
    # every response continues at the positions it has in its own sequence
    assert batch.position_ids[0, 0].tolist() == [0, 1, 2, 2, 3, 2, 2, 3, 4, 0, 1, 2, 3]
    assert batch.score_mask[0].tolist() == [False] * 3 + [True] * 6 + [False] * 2 + [True] * 2
    # first response token from the prompt's last position, then from the previous token
    src = batch.score_source[0][batch.score_mask[0]].tolist()
    assert src == [2, 3, 2, 2, 6, 7, 10, 11]
    assert spans == [[(3, 5), (5, 6), (6, 9)], [(11, 13)]]
    assert layout.length == 13 and layout.groups[0].prompt == (0, 3) and layout.groups[1].prompt == (9, 11)


def test_pack_refuses_a_response_on_another_prompt():
    g = _group([1, 2, 3], [[10], [11]])
    ids, pos = g.rows[1]
    g.rows[1] = (torch.cat([torch.tensor([9]), ids[1:]]), pos)
    with pytest.raises(ValueError, match="group 0: response 1 does not continue"):
        pack([g])


@pytest.mark.parametrize("path", ["one call per group", "one call per response"])
def test_layout_attention_equals_a_dense_masked_attention(path, monkeypatch):
    if path == "one call per response":  # the GPU path, and CPU past the mask size limit
        monkeypatch.setattr(shared, "MASK_ELEMENTS", 0)
    groups = [_group([1, 2, 3, 4], [[5, 6], [7], [8, 9, 10]]), _group([1, 2], [[3, 4, 5], [6, 7]])]
    _, layout, _ = pack(groups)
    L = layout.length + 3  # SP padding after the last group
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for g in layout.groups:
        p0, p1 = g.prompt
        allowed[p0:p1, p0:p1] = torch.ones(p1 - p0, p1 - p0, dtype=torch.bool).tril()
        for r0, r1 in g.responses:
            allowed[r0:r1, p0:p1] = True
            allowed[r0:r1, r0:r1] = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool).tril()
    allowed[layout.length:, layout.length:] = torch.ones(3, 3, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, requires_grad=True) for _ in range(3))
    got = layout.attend(q, k, v, 0.35, 0.0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.35)
    assert (got - want).abs().max() < 1e-6
    weights = torch.randn(want.shape, generator=g)
    grads_got = torch.autograd.grad((got * weights).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * weights).sum(), (q, k, v))
    assert max((a - b).abs().max() for a, b in zip(grads_got, grads_want)) < 1e-5
    # and it is not plain causal attention
    assert (got - F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.35)).abs().max() > 1e-2


def test_a_group_without_responses_is_refused():
    with pytest.raises(ValueError, match="no responses"):
        pack([PromptGroup(2, [], [])])
