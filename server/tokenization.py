"""vLLM's tokenizer endpoints: ``POST /tokenize`` and ``POST /detokenize``, with the served model's
own tokenizer and chat template (the ones completions and chat use), so a client can count a
prompt's tokens exactly as the server will.

Shapes as vLLM's ``serving_tokenization``: ``/tokenize`` takes ``{"model", "prompt"}`` or
``{"model", "messages"}`` and answers ``{"count", "max_model_len", "tokens", "token_strs"}``;
``/detokenize`` takes ``{"model", "tokens"}`` and answers ``{"prompt"}``. Neither needs the
engine process: the tokenizer lives in the API process (:class:`engine.processor.EngineInfo`).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from engine.request import InvalidRequestError
from server.errors import APIError
from server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                             TokenizeCompletionRequest, TokenizeResponse)
from server.requests import chat_messages, check_model, check_text


def _shape(body) -> str:
    """Which request a ``/tokenize`` body is: ``messages`` when it has them, else ``prompt``."""
    if isinstance(body, dict):
        return "messages" if "messages" in body else "prompt"
    return "messages" if isinstance(body, TokenizeChatRequest) else "prompt"


TokenizeRequest = Annotated[
    Union[Annotated[TokenizeCompletionRequest, Tag("prompt")],
          Annotated[TokenizeChatRequest, Tag("messages")]],
    Discriminator(_shape)]
"""A ``/tokenize`` body: a prompt, or chat messages (the union's tags, ``prompt`` and
``messages``, appear first in validation error locations)."""


def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, engine) -> TokenizeResponse:
    """The tokens of a prompt, or of messages through the chat template.

    Raises:
        APIError: 404 for another model's name; 400 for text that is not valid Unicode, or
            messages the chat template refuses (or a checkpoint without one).
    """
    check_model(body.model, engine)
    if isinstance(body, TokenizeChatRequest):
        try:
            ids = engine.apply_chat_template(chat_messages(body.messages),
                                             body.add_generation_prompt, body.add_special_tokens)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), exc.param) from exc
    else:
        check_text(body.prompt, "prompt")
        ids = engine.tokenize(body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=engine.token_strs(ids) if body.return_token_strs else None)


def detokenize(body: DetokenizeRequest, engine) -> DetokenizeResponse:
    """The text of token ids, special tokens kept (as vLLM's ``/detokenize``).

    Raises:
        APIError: 404 for another model's name; 400 naming ``tokens`` for an id outside the
            vocabulary.
    """
    check_model(body.model, engine)
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                            f"(0..{engine.vocab_size - 1})", "tokens")
    return DetokenizeResponse(prompt=engine.decode(body.tokens, skip_special_tokens=False))
