"""Output processing: streamed text pieces, and a finished row's result (text, closed and validated JSON).

Results are made on a small thread pool, never on the thread that drives the model: detokenizing, closing
a cut JSON answer and validating it are bounded, but they are one request's work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

from phi3v_tools.engine.row import Row
from phi3v_tools.engine.types import FinishReason, GenerationResult, Timings
from phi3v_tools.errors import GenerationError

logger = logging.getLogger(__name__)


class TextDeltas:
    """The new text of a growing token sequence, decoding a short window instead of the whole sequence.

    Decoding all tokens at every step costs O(n) per token (0.4 ms at 1000 tokens with Phi-3's tokenizer,
    per streaming row, on the thread that drives the GPU). Like TGI and vLLM, this decodes from a few tokens
    back (``prefix``) to the end and sends what goes beyond the text of the window's known part: the earlier
    tokens give the right leading space, and a piece that ends in half a UTF-8 character waits for the rest.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this have been sent

    def push(self, tokens: list[int]) -> str:
        """The text that ``tokens`` (the whole sequence so far) adds to what was returned before."""
        known = self._decode(tokens[self._prefix : self._read])
        text = self._decode(tokens[self._prefix :])
        if len(text) <= len(known) or text.endswith("\ufffd"):
            return ""  # nothing new yet (a special token), or half a UTF-8 character so far
        self._prefix, self._read = self._read, len(tokens)
        return text[len(known) :]


def hit_stop(row: Row, decode: Callable[[list[int]], str]) -> bool:
    """Whether the row's text now contains one of its request's stop sequences. Only the last tokens are decoded:
    enough for the longest sequence even in byte-fallback tokens (a character may take four)."""
    stops = row.handle.request.stop
    if not stops:
        return False
    window = decode(row.tokens[-(4 * max(map(len, stops)) + 8) :])
    return any(s in window for s in stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop sequence in it (the sequence itself left out, as in OpenAI's API)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def stream(row: Row, decode: Callable[[list[int]], str]) -> None:
    """Send the row's new text to its listener; a re-run after a failed step skips what was sent already."""
    if row.text is None:
        row.text = TextDeltas(decode)
    delta = row.text.push(row.tokens)
    if not delta:
        return
    handle = row.handle
    row.produced += delta
    sent = handle.streamed
    if not (row.produced.startswith(sent) or sent.startswith(row.produced)):
        raise GenerationError("the answer changed when it was re-run after a failed step; retry the request")
    # With stop sequences, the last characters that could begin one are held back until the text goes on (or
    # the row finishes: flush() sends them, cut at the sequence), so a stop sequence is never streamed.
    stops = handle.request.stop
    ready = row.produced
    if stops:
        cut = cut_at_stop(ready, stops)
        ready = cut if len(cut) < len(ready) else ready[: len(ready) - (max(map(len, stops)) - 1)]
    if len(ready) <= len(sent):  # a re-run: this part was sent already (or all of it is held back)
        return
    delta = ready[len(sent) :]
    handle.streamed = ready
    on_text = handle.request.on_text
    try:
        if on_text is not None:
            on_text(delta)
    except BaseException:  # noqa: BLE001  # a broken listener (even one raising SystemExit) must not break the batch
        logger.exception("a streaming callback failed")


def flush(row: Row, text: str) -> None:
    """Send what a stop request's listener has not had yet of its final ``text`` (held back by :func:`stream`)."""
    handle = row.handle
    on_text = handle.request.on_text
    if on_text is None or not handle.request.stop or not text.startswith(handle.streamed):
        return
    rest = text[len(handle.streamed) :]
    if not rest:
        return
    handle.streamed = text
    try:
        on_text(rest)
    except BaseException:  # noqa: BLE001  # as in stream(): a broken listener fails nothing else
        logger.exception("a streaming callback failed")


def make_result(row: Row, reason: FinishReason, decode: Callable[[list[int]], str]) -> GenerationResult:
    """The result of a finished row: its text, and with a schema the parsed value (closed if cut, validated)."""
    handle = row.handle
    text = decode(row.tokens)
    if handle.request.stop:
        text = cut_at_stop(text, handle.request.stop)
    parsed = None
    truncated = reason == "length"
    if handle.schema is not None:
        try:
            parsed = handle.schema.complete(text) if truncated else json.loads(text)
        except ValueError as exc:
            raise GenerationError(f"the model's JSON could not be read: {exc}") from None
        problem = handle.schema.validate(parsed)
        if problem is not None:
            raise GenerationError(f"the model's answer does not match the schema ({problem})")
        if truncated:
            text = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
    timings = Timings(
        queue_s=handle.started - handle.submitted,
        preprocess_s=row.preprocess_s,
        vision_s=row.vision_s,
        prefill_s=row.prefill_s,
        decode_s=row.last_token_at - row.first_token_at,
        total_s=time.perf_counter() - handle.submitted,
        first_token_s=row.first_token_at - handle.submitted if row.first_token_at else 0.0,
    )
    return GenerationResult(
        text=text,
        parsed=parsed,
        truncated=truncated,
        finish_reason=reason,
        prompt_tokens=len(row.ids),
        completion_tokens=len(row.tokens),
        image_tokens=row.image_tokens,
        cached_images=row.cached_images,
        timings=timings,
    )
