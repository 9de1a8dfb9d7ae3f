"""Engine outputs → OpenAI response bodies, for completions and chat, whole or as stream chunks.

A formatter turns one choice's :class:`~engine.request.RequestOutput` deltas into the API's
shape: :class:`CompletionFormatter` (``text_completion``, legacy ``logprobs`` with ``echo``) and
:class:`ChatFormatter` (``chat.completion``). Whole responses are the concatenation of the same
deltas, so streamed and non-streamed text agree byte for byte.
"""

from __future__ import annotations

from engine.request import RequestOutput, TokenLogprob
from server.protocol import (ChatChoice, ChatCompletionResponse, ChatLogprobs, ChatResponseMessage,
                             ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
                             CompletionResponse, PromptTokensDetails, SpecDecodeStats, TopLogprob,
                             UsageInfo)
from server.requests import PromptInfo


def usage_of(lasts: dict[int, RequestOutput], n: int) -> UsageInfo:
    """Totals over all choices' latest outputs (indexed prompt-major): each prompt, and its
    tokens found in the prefix cache, counted once, however large ``n``."""
    firsts = [o for i, o in lasts.items() if i % n == 0]
    p = sum(o.num_prompt_tokens for o in firsts)
    c = sum(o.num_output_tokens for o in lasts.values())
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(o.num_cached_tokens for o in firsts)))


def spec_stats(outs: list[RequestOutput]) -> SpecDecodeStats:
    """The request's speculation totals over its choices."""
    drafted = sum(o.num_draft_tokens for o in outs)
    accepted = sum(o.num_accepted_tokens for o in outs)
    return SpecDecodeStats(num_draft_tokens=drafted, num_accepted_tokens=accepted,
                           acceptance_rate=accepted / drafted if drafted else None)


def _with_nulls(body: dict, out: RequestOutput | None) -> dict:
    """A one-choice chunk with ``logprobs``, ``finish_reason`` and ``stop_reason`` always present
    (null until set), as OpenAI and vLLM send them."""
    choice = body["choices"][0]
    choice.setdefault("logprobs", None)
    choice["finish_reason"] = out.finish_reason if out else None
    choice["stop_reason"] = out.stop_reason if out else None
    return body


def _top_dict(entry: TokenLogprob, chosen_text: str) -> dict[str, float]:
    """The legacy ``top_logprobs`` dict: the alternatives, and the chosen token (as vLLM), the
    chosen one keyed by ``chosen_text`` (its entry in ``tokens``, so that a client comparing the
    two, as lm-evaluation-harness's ``is_greedy`` does, finds it)."""
    top = {}
    for text, token_id, lp, _ in entry.top_logprobs:
        top.setdefault(chosen_text if token_id == entry.token_id else text, lp)
    top.setdefault(chosen_text, entry.logprob)
    return top


class CompletionFormatter:
    """``text_completion`` choices; with ``echo`` the first delta starts with the prompt.

    Args:
        prompts: the request's prompts (choice ``i`` belongs to prompt ``i // n``).
        n: choices per prompt.
        echo: prepend the prompt (text, and logprobs when asked).
        decode: token ids → text, for prompts sent as token ids (``engine.decode_prompt``: a
            character the prompt ends inside is left to the completion's text).
        detokenizer: prompt token ids → an ``engine.detokenizer.IncrementalDetokenizer``
            (``engine.detokenizer``), so that the logprobs' ``tokens`` concatenate to the text
            (a token that ends inside a character has ``""``, the one completing it the whole
            character); None: each token's own text.
        return_token_ids: vLLM's ``return_token_ids``: each choice carries its
            ``prompt_token_ids`` (a stream: in the choice's first chunk) and the ``token_ids``
            it emitted (a stream: each chunk's new ones).
    """

    def __init__(self, response_id: str, model: str, prompts: list[PromptInfo], n: int,
                 echo: bool, decode, created: int | None = None, detokenizer=None,
                 return_token_ids: bool = False):
        self.response_id, self.model, self.prompts, self.n = response_id, model, prompts, n
        self.echo, self.decode, self.created = echo, decode, created
        self.detokenizer = detokenizer
        self.return_token_ids = return_token_ids
        self._offsets: dict[int, int] = {}
        self._detoks: dict[int, object] = {}

    def _ids(self, index: int, token_ids: list[int], first: bool) -> dict:
        """The ``prompt_token_ids`` / ``token_ids`` fields of a choice (none unless asked)."""
        if not self.return_token_ids:
            return {}
        ids = {"token_ids": list(token_ids)}
        if first:
            ids["prompt_token_ids"] = list(self.prompts[index // self.n].token_ids)
        return ids

    def delta(self, index: int, out: RequestOutput, first: bool) -> tuple[str, CompletionLogprobs | None]:
        """One output's text and logprobs; ``first`` for the choice's first output."""
        text, entries, lead = out.text, out.logprobs, None
        prompt = self.prompts[index // self.n]
        if first and self.echo:
            text = (prompt.text if prompt.text is not None else self.decode(prompt.token_ids)) + text
            if out.prompt_logprobs is not None:
                lead = prompt.token_ids[0]
                entries = out.prompt_logprobs + (entries or [])
        if entries is None:
            return text, None
        if first and self.detokenizer is not None:  # the echo's logprobs start from the prompt's start
            self._detoks[index] = self.detokenizer([] if lead is not None else prompt.token_ids)
        return text, self._logprobs(index, entries, lead, out.finished)

    def _token_texts(self, index: int, ids: list[int], final: bool) -> list[str] | None:
        """Each token's share of the text (None without a detokenizer)."""
        detok = self._detoks.get(index)
        if detok is None:
            return None
        return [detok.add([t], final=final and i == len(ids) - 1) for i, t in enumerate(ids)]

    def _logprobs(self, index: int, entries: list[TokenLogprob], lead: int | None,
                  final: bool) -> CompletionLogprobs:
        ids = ([] if lead is None else [lead]) + [e.token_id for e in entries]
        texts = self._token_texts(index, ids, final)
        if texts is None:
            texts = ([] if lead is None else [self.decode([lead])]) + [e.token for e in entries]
        tokens, lps, tops = [], [], []
        if lead is not None:  # the prompt's first token has no logprob
            tokens.append(texts.pop(0))
            lps.append(None)
            tops.append(None)
        for e, text in zip(entries, texts):
            tokens.append(text)
            lps.append(e.logprob)
            tops.append(_top_dict(e, text))
        offset, offsets = self._offsets.get(index, 0), []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        self._offsets[index] = offset
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops,
                                  text_offset=offsets)

    def chunks(self, index: int, out: RequestOutput, first: bool) -> list[dict]:
        """The SSE chunks for one output (none when it carries nothing)."""
        text, logprobs = self.delta(index, out, first)
        ids = self._ids(index, out.token_ids, first)
        if not (text or out.finished or logprobs is not None or ids.get("token_ids")
                or "prompt_token_ids" in ids):
            return []
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                  finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                  **ids)
        return [_with_nulls(self._response([choice]).model_dump(exclude_none=True), out)]

    def _response(self, choices, **kw) -> CompletionResponse:
        extra = {} if self.created is None else {"created": self.created}
        return CompletionResponse(id=self.response_id, model=self.model, choices=choices, **extra, **kw)

    def final_chunk(self, usage: UsageInfo | None, spec: SpecDecodeStats) -> dict:
        """The last chunk: no choices, the totals (``acceptance_rate`` null, not absent, when
        nothing was drafted)."""
        body = self._response([], usage=usage).model_dump(exclude_none=True)
        body["spec_decode"] = spec.model_dump()
        return body

    def whole(self, results: list[list[RequestOutput]]) -> CompletionResponse:
        """The non-streamed response from every choice's outputs."""
        choices = []
        for index, outs in enumerate(results):
            texts, entries = [], []
            for i, out in enumerate(outs):
                text, lp = self.delta(index, out, i == 0)
                texts.append(text)
                entries.append(lp)
            logprobs = None
            if any(e is not None for e in entries):
                parts = [e for e in entries if e is not None]
                logprobs = CompletionLogprobs(
                    tokens=[t for p in parts for t in p.tokens],
                    token_logprobs=[t for p in parts for t in p.token_logprobs],
                    top_logprobs=[t for p in parts for t in p.top_logprobs],
                    text_offset=[t for p in parts for t in p.text_offset])
            last = outs[-1]
            ids = self._ids(index, [t for o in outs for t in o.token_ids], True)
            choices.append(CompletionChoice(index=index, text="".join(texts), logprobs=logprobs,
                                            finish_reason=last.finish_reason,
                                            stop_reason=last.stop_reason, **ids))
        lasts = [outs[-1] for outs in results]
        return self._response(choices, usage=usage_of(dict(enumerate(lasts)), self.n),
            spec_decode=spec_stats(lasts))


def _chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token_bytes),
                         top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(raw))
                                       for t, _, lp, raw in e.top_logprobs])
        for e in entries])


class ChatFormatter:
    """``chat.completion`` choices; a stream opens each choice with a ``role`` delta.

    Args:
        prompt_token_ids: the templated prompt; with ``return_token_ids`` (vLLM's) the response
            carries it as ``prompt_token_ids`` (a stream: in the first chunk) and each choice its
            ``token_ids`` (a stream: each chunk's new ones).
    """

    def __init__(self, response_id: str, model: str, n: int, created: int | None = None,
                 prompt_token_ids: list[int] | None = None, return_token_ids: bool = False):
        self.response_id, self.model, self.n, self.created = response_id, model, n, created
        self.prompt_token_ids, self.return_token_ids = prompt_token_ids, return_token_ids
        self._sent_prompt_ids = False

    def _prompt_ids(self) -> dict:
        """``prompt_token_ids`` for the response (or the stream's first chunk) when asked."""
        if not self.return_token_ids or self._sent_prompt_ids:
            return {}
        self._sent_prompt_ids = True
        return {"prompt_token_ids": list(self.prompt_token_ids or [])}

    def _response(self, choices, **kw) -> ChatCompletionResponse:
        extra = {} if self.created is None else {"created": self.created}
        return ChatCompletionResponse(id=self.response_id, model=self.model, choices=choices,
                                      **extra, **kw)

    def chunks(self, index: int, out: RequestOutput, first: bool) -> list[dict]:
        """The SSE chunks for one output: a choice opens with ``{"role": "assistant",
        "content": ""}`` alone, as OpenAI's stream does; then the content deltas."""
        bodies = []
        if first:
            opening = ChatChoice(index=index, delta=ChatResponseMessage(role="assistant", content=""))
            bodies.append(self._chunk(opening, None, **self._prompt_ids()))
        ids = out.token_ids if self.return_token_ids else []
        if out.text or out.finished or out.logprobs or ids:
            choice = ChatChoice(index=index, delta=ChatResponseMessage(content=out.text),
                                logprobs=_chat_logprobs(out.logprobs),
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                token_ids=list(ids) if self.return_token_ids else None)
            bodies.append(self._chunk(choice, out))
        return bodies

    def _chunk(self, choice: ChatChoice, out: RequestOutput | None, **kw) -> dict:
        body = self._response([choice], object="chat.completion.chunk",
                              **kw).model_dump(exclude_none=True)
        return _with_nulls(body, out)

    def final_chunk(self, usage: UsageInfo | None, spec: SpecDecodeStats) -> dict:
        """The last chunk: no choices, the totals (``acceptance_rate`` null when nothing was
        drafted)."""
        body = self._response([], object="chat.completion.chunk",
                              usage=usage).model_dump(exclude_none=True)
        body["spec_decode"] = spec.model_dump()
        return body

    def whole(self, results: list[list[RequestOutput]]) -> ChatCompletionResponse:
        """The non-streamed response from every choice's outputs."""
        choices = []
        for index, outs in enumerate(results):
            entries = [e for o in outs for e in (o.logprobs or [])]
            last = outs[-1]
            choices.append(ChatChoice(
                index=index, message=ChatResponseMessage(role="assistant",
                                                         content="".join(o.text for o in outs)),
                logprobs=_chat_logprobs(entries if last.logprobs is not None else None),
                finish_reason=last.finish_reason, stop_reason=last.stop_reason,
                token_ids=[t for o in outs for t in o.token_ids] if self.return_token_ids
                else None))
        lasts = [outs[-1] for outs in results]
        return self._response(choices, usage=usage_of(dict(enumerate(lasts)), self.n),
            spec_decode=spec_stats(lasts), **self._prompt_ids())
