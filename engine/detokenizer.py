"""Incremental, UTF-8 safe detokenization (the prefix/read-offset scheme of vLLM and TGI).

A byte-level BPE token can end in the middle of a multi-byte character; decoding it alone gives
U+FFFD. Each step decodes the window from ``prefix_offset`` and emits only the text past what the
window before the new tokens decoded to, holding the delta back while it ends in U+FFFD. The
hold-back is bounded: after :data:`MAX_HELD_TOKENS` tokens (a UTF-8 character has at most 4
bytes) the text goes out as it is, so a model that really emits invalid bytes cannot stall a
stream. The concatenated deltas equal the decoding of all output tokens.

A prompt can end inside a character too (a token-id prompt such as ``[7, 2605]`` on the bundled
model, whose last token holds the first two bytes of "’"). That character belongs to the
completion, whose first token completes it: the detokenizer's first delta starts with it, and
:func:`decode_whole_characters` (the ``echo`` of a token-id prompt) leaves its U+FFFD out, so
that the echo plus the completion equal the decoding of prompt + output.
"""

from __future__ import annotations

import codecs

MAX_HELD_TOKENS = 4
_CONTEXT_TOKENS = 5
_MAX_PARTIAL_TOKENS = 3  # a UTF-8 character has at most 4 bytes, so at most 3 are ever pending


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def ends_inside_character(tokenizer, token_ids) -> bool:
    """Whether the raw bytes of ``token_ids`` end with an incomplete UTF-8 character (the start
    of one that later tokens may complete), as opposed to whole characters or a real U+FFFD.

    Cheap when they do not: the bytes are only looked at when the decoded text ends in U+FFFD.
    """
    ids = list(token_ids[-_CONTEXT_TOKENS:])
    if not ids or not _decode(tokenizer, ids).endswith("\ufffd"):
        return False
    raw = TokenBytes(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(b"".join(raw(i) for i in ids[-_MAX_PARTIAL_TOKENS:]), final=False)
    return bool(decoder.getstate()[0])  # the bytes it holds, waiting for the rest of a character


def decode_whole_characters(tokenizer, token_ids) -> str:
    """The text of ``token_ids`` (special tokens skipped) without the U+FFFD of a character they
    end inside (:func:`ends_inside_character`): the ``echo`` of a token-id prompt, whose
    completion's first delta carries that character whole."""
    text = _decode(tokenizer, list(token_ids))
    return text[:-1] if ends_inside_character(tokenizer, token_ids) else text


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
        # The prompt ends inside a character: its U+FFFD is not text already shown, so the
        # first delta starts with the whole character once an output token completes it.
        self._prompt_partial = ends_inside_character(tokenizer, self.ids)

    def _decode(self, ids: list[int]) -> str:
        return _decode(self.tokenizer, ids)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the text that became complete (``""`` while held back).

        The longest prefix of the pending tokens that decodes to whole characters goes out; the
        rest waits. If nothing decodes cleanly and more than :data:`MAX_HELD_TOKENS` tokens
        wait, the bytes are invalid rather than split, and the oldest pending token goes out
        as it decodes. ``final`` flushes everything (the sequence finished).
        """
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if self._prompt_partial:
            prefix_text = prefix_text[:-1]
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
        self._prompt_partial = False
        return text[len(prefix_text):]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenBytes:
    """The raw bytes of single tokens (OpenAI's logprobs ``bytes``): byte-level BPE pieces through
    GPT-2's byte table, SentencePiece byte-fallback pieces (``<0xNN>``) as that byte, anything
    else as the UTF-8 of its piece (SentencePiece's ``▁`` read as a space). A token that holds
    part of a character thus gives its own bytes, not those of U+FFFD.

    Args:
        tokenizer: a transformers tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if self.byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")
