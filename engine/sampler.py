"""Token choice and the speculative acceptance rule, behind one function each.

Greedy decoding only in this version: a draft token is accepted while it equals the full model's
argmax at its position (the longest agreeing prefix), then the full model's own next token is
emitted (LayerSkip §5.2; Leviathan et al. 2023 with temperature 0). Rejection sampling for
``temperature > 0`` plugs into :func:`accept_drafts` with the same signature.
"""

from __future__ import annotations

import torch


def draft_token(logits: torch.Tensor) -> torch.Tensor:
    """Choose each row's draft token: ``(B, 1, V)`` draft logits → ``(B, 1)`` token ids (greedy)."""
    return logits.argmax(-1)


def accept_drafts(draft_tokens: torch.Tensor, target_logits: torch.Tensor):
    """The acceptance rule: how many drafts each sequence keeps, and the tokens it emits.

    Args:
        draft_tokens: ``(B, k)`` drafted tokens ``d_1..d_k`` (``k`` may be 0).
        target_logits: ``(B, k + 1, V)`` full-model logits ``p_0..p_k``; ``p_i`` predicts the token
            after the ``i``-th draft.

    Returns:
        ``(tokens, num_accepted)``: ``tokens`` ``(B, k + 1)`` and ``num_accepted`` ``(B,)``.
        Sequence ``b`` emits ``tokens[b, :num_accepted[b] + 1]``: its accepted drafts and the full
        model's token after them. Under greedy decoding an accepted draft equals the full model's
        argmax, so the emitted tokens are the argmaxes themselves.
    """
    target = target_logits.argmax(-1)  # (B, k+1)
    k = draft_tokens.shape[1]
    if k == 0:
        return target, torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    match = (draft_tokens == target[:, :k]).long()  # (B, k)
    return target, match.cumprod(dim=1).sum(dim=1)
