"""Incremental, UTF-8 safe detokenization (the prefix/read-offset scheme of vLLM and TGI).

A byte-level BPE token can end in the middle of a multi-byte character; decoding it alone gives
U+FFFD. Each step decodes the window from ``prefix_offset`` and emits only the text past what the
window before the new tokens decoded to, holding the delta back while it ends in U+FFFD. The
hold-back is bounded: after :data:`MAX_HELD_TOKENS` tokens (a UTF-8 character has at most 4
bytes) the text goes out as it is, so a model that really emits invalid bytes cannot stall a
stream. The concatenated deltas equal the decoding of all output tokens.
"""

from __future__ import annotations

MAX_HELD_TOKENS = 4
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_token_ids: the prompt; its last few tokens give decoders that depend on the
            previous token (SentencePiece's leading space) their context, and are never emitted.
    """

    def __init__(self, tokenizer, prompt_token_ids):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the text that became complete (``""`` while held back).

        The longest prefix of the pending tokens that decodes to whole characters goes out; the
        rest waits. If nothing decodes cleanly and more than :data:`MAX_HELD_TOKENS` tokens
        wait, the bytes are invalid rather than split, and the oldest pending token goes out
        as it decodes. ``final`` flushes everything (the sequence finished).
        """
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if final:
            return self._advance(self._decode(self.ids[self.prefix_offset:]), prefix_text, len(self.ids))
        for end in range(len(self.ids), self.read_offset, -1):
            text = self._decode(self.ids[self.prefix_offset:end])
            if not text.endswith("\ufffd"):
                return self._advance(text, prefix_text, end)
        if len(self.ids) - self.read_offset > MAX_HELD_TOKENS:
            end = self.read_offset + 1
            return self._advance(self._decode(self.ids[self.prefix_offset:end]), prefix_text, end)
        return ""

    def _advance(self, text: str, prefix_text: str, end: int) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, end
        return text[len(prefix_text):]
