"""The greedy acceptance rule on hand-written logits."""

import torch

from engine.sampler import accept_drafts


def _logits_for(argmaxes: list[list[int]], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), len(argmaxes[0]), vocab)
    for b, row in enumerate(argmaxes):
        for t, tok in enumerate(row):
            logits[b, t, tok] = 1.0
    return logits


def test_longest_agreeing_prefix_plus_one():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [5, 2, 3], [1, 2, 3]])
    target = _logits_for([[1, 2, 3, 4], [1, 7, 3, 4], [1, 2, 3, 4], [1, 2, 6, 0]])
    tokens, accepted = accept_drafts(drafts, target)
    assert accepted.tolist() == [3, 1, 0, 2]
    emitted = [tokens[b, :j + 1].tolist() for b, j in enumerate(accepted.tolist())]
    assert emitted == [[1, 2, 3, 4], [1, 7], [1], [1, 2, 6]]


def test_a_later_match_after_a_mismatch_is_not_accepted():
    tokens, accepted = accept_drafts(torch.tensor([[9, 2]]), _logits_for([[1, 2, 3]], 10))
    assert accepted.tolist() == [0]
    assert tokens[0, :1].tolist() == [1]


def test_no_drafts_is_plain_decoding():
    tokens, accepted = accept_drafts(torch.zeros(2, 0, dtype=torch.long), _logits_for([[4], [6]]))
    assert accepted.tolist() == [0, 0]
    assert tokens[:, 0].tolist() == [4, 6]
