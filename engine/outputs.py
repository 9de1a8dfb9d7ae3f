"""The single output loop: a step's new tokens → stop checks → text deltas → ``RequestOutput``.

A round can accept several tokens at once; EOS and ``max_tokens`` cut that chunk exactly where
they fall, and nothing after the cut is appended, counted or emitted (ARCHITECTURE.md §2).
"""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.request import RequestOutput, Sequence, SequenceStatus


def append_with_stops(seq: Sequence, new_tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    """Append ``new_tokens`` to ``seq`` up to the first stop; return the tokens kept.

    Sets ``seq.status`` to ``FINISHED_STOPPED`` at EOS (unless the request ignores EOS; the EOS
    token is kept and counted, as OpenAI and vLLM count it) or ``FINISHED_LENGTH`` when
    ``max_tokens`` tokens have come out.
    """
    kept = []
    for token in new_tokens:
        seq.token_ids.append(token)
        kept.append(token)
        if token in eos_token_ids and not seq.request.ignore_eos:
            seq.status = SequenceStatus.FINISHED_STOPPED
            break
        if seq.num_output_tokens >= seq.request.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH
            break
    return kept


def make_output(seq: Sequence, kept: list[int], detok: IncrementalDetokenizer,
                error: str | None = None) -> RequestOutput:
    """Build the step's ``RequestOutput`` for ``seq`` from the tokens it kept."""
    finished = seq.status.is_finished
    return RequestOutput(
        request_id=seq.request_id, token_ids=kept, text=detok.add(kept, final=finished),
        finish_reason=seq.status.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens, num_draft_tokens=seq.num_draft_tokens,
        num_accepted_tokens=seq.num_accepted_tokens, error=error,
    )
