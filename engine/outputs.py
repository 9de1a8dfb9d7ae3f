"""The single output loop: a step's new tokens → stop checks → text deltas → ``RequestOutput``.

A round can accept several tokens at once; EOS, a stop token, a stop string and ``max_tokens``
cut that chunk exactly where they fall, and nothing after the cut is appended, counted, given
logprobs or emitted (docs/ARCHITECTURE.md §2). Stop strings are searched in the decoded text, also
across token and chunk boundaries; the returned text ends before the stop string. While a
request has stop strings, the last ``len(longest stop) − 1`` characters are held back from the
stream (they could be the start of a stop string), as vLLM does, so that the concatenated deltas
always equal the final text.
"""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.request import RequestOutput, Sequence, SequenceStatus


def append_with_stops(seq: Sequence, new_tokens: list[int], eos_token_ids: frozenset[int],
                      detok: IncrementalDetokenizer) -> list[int]:
    """Append ``new_tokens`` to ``seq`` up to the first stop; return the tokens kept.

    Each kept token's text is added to ``seq.output_text``. Sets ``seq.status`` to
    ``FINISHED_STOPPED`` at EOS (unless the request ignores EOS), a stop token or a stop string
    (the token that completes it is kept and counted, as vLLM counts it; its text is cut), or to
    ``FINISHED_LENGTH`` when ``max_tokens`` tokens have come out. EOS and stop tokens are kept and
    counted, as OpenAI and vLLM count them; they add no text.
    """
    params = seq.request.sampling
    stop_ids = set(params.stop_token_ids)
    if not seq.request.ignore_eos:
        stop_ids |= eos_token_ids
    kept = []
    for token in new_tokens:
        seq.token_ids.append(token)
        kept.append(token)
        at_stop_token = token in stop_ids
        at_length = seq.num_output_tokens >= seq.request.max_tokens
        searched_from = len(seq.output_text)
        if at_stop_token:  # counted, but its text is not output (as vLLM); flush what is held
            seq.output_text += detok.add([], final=True)
        else:
            seq.output_text += detok.add([token], final=at_length)
        if params.stop and _cut_at_stop_string(seq, searched_from):
            seq.status = SequenceStatus.FINISHED_STOPPED
            break
        if at_stop_token:
            seq.status = SequenceStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                seq.stop_reason = token
            break
        if at_length:
            seq.status = SequenceStatus.FINISHED_LENGTH
            break
    return kept


def _cut_at_stop_string(seq: Sequence, searched_from: int) -> bool:
    """Cut ``seq.output_text`` before the earliest stop string that ends in its new text."""
    stops = seq.request.sampling.stop
    start = max(0, searched_from - max(len(s) for s in stops) + 1)
    found = [(i, s) for s in stops if (i := seq.output_text.find(s, start)) >= 0]
    if not found:
        return False
    index, stop = min(found)
    seq.output_text = seq.output_text[:index]
    seq.stop_reason = stop
    return True


def make_output(seq: Sequence, kept: list[int], detok: IncrementalDetokenizer,
                error: str | None = None, logprobs=None, prompt_logprobs=None) -> RequestOutput:
    """Build the step's ``RequestOutput`` for ``seq`` from the tokens it kept.

    The text delta is what ``seq.output_text`` gained, less the stop-string hold-back while
    the sequence runs; an aborted sequence flushes what the detokenizer held.
    """
    finished = seq.status.is_finished
    stops = seq.request.sampling.stop
    if finished and not kept and seq.stop_reason is None:  # abort/error: flush held bytes
        seq.output_text += detok.add([], final=True)
    hold = 0 if finished or not stops else max(len(s) for s in stops) - 1
    end = max(seq.num_sent_chars, len(seq.output_text) - hold)
    text = seq.output_text[seq.num_sent_chars:end]
    seq.num_sent_chars = end
    return RequestOutput(
        request_id=seq.request_id, token_ids=kept, text=text,
        finish_reason=seq.status.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens, num_draft_tokens=seq.num_draft_tokens,
        num_accepted_tokens=seq.num_accepted_tokens,
        num_cached_tokens=seq.num_cached_tokens, error=error, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, stop_reason=seq.stop_reason,
    )
