"""Packing layout: positions, pred_pos, splitting, truncation, stats (no model needed)."""

import pytest
import torch
from conftest import completions_of
from hypothesis import given, settings
from hypothesis import strategies as st

from packrl.packed.packing import pack_groups
from packrl.rollout.group import GroupRollout


def make_group(prompt, completions, advantages=None, weights=None) -> GroupRollout:
    G = len(completions)
    return GroupRollout(
        prompt_ids=list(prompt),
        completions=completions_of(
            [list(c) for c in completions],
            [[-0.01 * (t + 1) for t in range(len(c))] for c in completions],
        ),
        advantages=advantages if advantages is not None else [float(j) for j in range(G)],
        loss_weights=weights if weights is not None else [1.0 / (j + 1) for j in range(G)],
    )


def test_docstring_example_layout():
    b = pack_groups([make_group([10, 11, 12], [[20, 21], [30, 31, 32]])], row_len=10, pad_id=0)
    assert b.tokens.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 0]]
    assert b.group_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]]
    assert b.parent_ids.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, -1, -1]]
    assert b.trained.tolist() == [[False] * 3 + [True] * 5 + [False] * 2]
    # the second sibling's first token is predicted by the last prompt token (index 2),
    # not by the previous sibling's last token (index 4)
    assert b.pred_pos.tolist() == [[0, 1, 2, 2, 3, 2, 5, 6, 8, 9]]
    assert b.seq_ids.tolist() == [[-1, -1, -1, 0, 0, 1, 1, 1, -1, -1]]
    assert b.advantages.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0]]
    assert b.loss_weights.tolist() == [[0, 0, 0, 1, 1, 0.5, 0.5, 0.5, 0, 0]]
    assert torch.allclose(
        b.behaviour_logprobs[0, 3:8], torch.tensor([-0.01, -0.02, -0.01, -0.02, -0.03])
    )


def test_shared_leading_tokens_are_all_trained():
    # all siblings start with the same 3 tokens: nothing is merged, every token is trained
    comps = [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7]]
    b = pack_groups([make_group([1, 2], comps)], row_len=16)
    assert int(b.trained.sum()) == 11
    for j, c in enumerate(comps):
        assert b.tokens[b.seq_ids == j].tolist() == c
        first = (b.seq_ids[0] == j).nonzero()[0, 0]
        assert b.pred_pos[0, first] == 1  # last prompt token


def test_group_larger_than_row_splits_with_prompt_repeated():
    prompt = list(range(100, 106))  # 6 tokens
    comps = [[j] * n for j, n in enumerate([7, 5, 9, 3, 8, 4])]  # 36 completion tokens
    b = pack_groups([make_group(prompt, comps)], row_len=16)
    assert b.num_rows >= 4  # each row holds the prompt + at most 10 completion tokens
    for r in range(b.num_rows):
        assert b.tokens[r, :6].tolist() == prompt  # the prompt leads every row
        assert b.positions[r, :6].tolist() == list(range(6))
    for j, c in enumerate(comps):
        sel = b.seq_ids == j
        assert sel.any(dim=1).sum() == 1  # a completion is never split
        assert b.tokens[sel].tolist() == c
        assert b.positions[sel].tolist() == list(range(6, 6 + len(c)))
        r, first = sel.nonzero()[0].tolist()
        assert b.pred_pos[r, first] == 5


def test_too_long_raises_with_sizes_and_fix():
    g = make_group([1] * 10, [[2] * 5, [3] * 30])
    with pytest.raises(
        ValueError,
        match=r"completion 1: prompt \(10\) \+ completion \(30\) = 40.*row_len=32.*truncate=True",
    ):
        pack_groups([g], row_len=32)
    with pytest.raises(ValueError, match="raise row_len above 10"):
        pack_groups([make_group([1] * 10, [[2]])], row_len=10, truncate=True)


def test_truncate_cuts_completion_to_row():
    g = make_group([1] * 10, [[2] * 5, list(range(30))])
    b = pack_groups([g], row_len=32, truncate=True)
    kept = b.tokens[b.seq_ids == 1].tolist()
    assert kept == list(range(22))  # 32 - 10 prompt tokens
    assert b.behaviour_logprobs[b.seq_ids == 1].shape == (22,)
    assert b.stats.trained_tokens == 5 + 22


def test_bad_shapes_name_the_field():
    g = make_group([1, 2], [[3], [4]])
    g.advantages = [1.0]
    with pytest.raises(ValueError, match="advantages has 1 entries but there are 2 completions"):
        pack_groups([g], row_len=8)
    g = make_group([1, 2], [[3], [4]])
    g.completions[1].logprobs = []
    with pytest.raises(ValueError, match="completion 1: 1 tokens but 0 behaviour logprobs"):
        pack_groups([g], row_len=8)


def test_stats_by_hand():
    g1 = make_group([1] * 4, [[2] * 3, [3] * 5])  # sequences of 7 and 9
    g2 = make_group([4] * 6, [[5] * 2])  # sequence of 8
    b = pack_groups([g1, g2], row_len=20)
    s = b.stats
    assert (s.rows, s.row_len, s.sequences) == (1, 20, 3)
    assert s.trained_tokens == 10
    assert s.tokens == 4 + 8 + 6 + 2
    assert s.positions == 20
    assert s.padded_positions == 3 * 9
    assert s.unshared_positions == 7 + 9 + 8
    assert s.saved_fraction == pytest.approx(1 - 20 / 27)
    # select_rows recomputes them for the rows it keeps
    b2 = pack_groups([g1, g2], row_len=12)
    sub = b2.select_rows([0])
    assert b2.num_rows == 2 and b2.tokens[0, :4].tolist() == [1] * 4  # g1 fills row 0
    s = sub.stats
    assert (s.rows, s.sequences, s.trained_tokens, s.tokens) == (1, 2, 8, 12)
    assert (s.padded_positions, s.unshared_positions) == (2 * 9, 7 + 9)


def test_padding_only_row_and_empty_completion():
    g = make_group([1, 2, 3], [[], [4]])  # an empty completion has nothing to train
    b = pack_groups([g], row_len=8)
    assert b.stats.sequences == 1
    assert b.tokens[b.seq_ids == 1].tolist() == [4]


@st.composite
def batches(draw):
    row_len = draw(st.integers(8, 64))
    groups = []
    for _ in range(draw(st.integers(1, 5))):
        P = draw(st.integers(1, row_len - 1))
        lens = draw(st.lists(st.integers(1, row_len - P), min_size=1, max_size=9))
        prompt = draw(st.lists(st.integers(0, 50), min_size=P, max_size=P))
        comps = [draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)) for n in lens]
        groups.append(make_group(prompt, comps))
    return groups, row_len


@settings(max_examples=60, deadline=None)
@given(batches())
def test_packing_invariants(case):
    groups, row_len = case
    b = pack_groups(groups, row_len)
    seq = 0
    for g in groups:
        P = len(g.prompt_ids)
        for j, c in enumerate(c.token_ids for c in g.completions):
            sel = b.seq_ids == seq
            rows = sel.any(dim=1).nonzero()[:, 0]
            assert len(rows) == 1  # one completion, one row, contiguous
            r = int(rows[0])
            cols = sel[r].nonzero()[:, 0]
            assert (cols.diff() == 1).all()
            assert b.tokens[r, cols].tolist() == c
            assert b.positions[r, cols].tolist() == list(range(P, P + len(c)))
            assert b.trained[r, cols].all()
            assert (b.advantages[r, cols] == g.advantages[j]).all()
            # its prompt is in the same row: the parent segment, ending at pred_pos[first]
            parent = int(b.parent_ids[r, cols[0]])
            pcols = (b.group_ids[r] == parent).nonzero()[:, 0]
            assert b.tokens[r, pcols].tolist() == g.prompt_ids
            assert int(b.pred_pos[r, cols[0]]) == int(pcols[-1])
            assert b.pred_pos[r, cols[1:]].tolist() == cols[:-1].tolist()
            assert parent < int(b.group_ids[r, cols[0]])  # the prompt comes first
            seq += 1
    assert b.stats.trained_tokens == sum(len(c.token_ids) for g in groups for c in g.completions)
    # first-fit: no two rows could have been merged
    load = (b.group_ids != -1).sum(dim=1)
    for i in range(b.num_rows):
        for k in range(i + 1, b.num_rows):
            assert load[i] + load[k] > row_len


def test_trimmed_cuts_trailing_padding_to_a_block_multiple():
    g = make_group([1, 2, 3], [[4, 5], [6]])  # 6 positions used
    b = pack_groups([g], row_len=64)
    t = b.trimmed(4)
    assert t.row_len == 8 and t.tokens[0, :6].tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.equal(t.pred_pos, b.pred_pos[:, :8]) and t.stats == b.stats
    assert b.trimmed(64) is b  # nothing to cut
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        b.trimmed(0)
