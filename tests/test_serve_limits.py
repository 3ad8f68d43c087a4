"""The serve limits' pieces on their own: the bounded tokenizer pool, the bound on text
length that needs no tokenising, and the log filter that drops repeats."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from serve_fixtures import make_checkpoint

from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.scheduler.serve import Context, ServeLimits
from dejavu.scheduler.serve.connections import RepeatFilter
from dejavu.scheduler.serve.context import INLINE_CHARS
from dejavu.scheduler.serve.errors import ApiError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_checkpoint(tmp_path_factory.mktemp("lim") / "tiny"))


def _context(tokenizer, max_len: int = 96, **limits) -> Context:
    client = SimpleNamespace(max_len=max_len, vocab_size=tokenizer.vocab_size,
                             health=lambda: None)
    return Context(client, tokenizer, "tiny", ServeLimits(**limits))


def test_encode_equals_the_backends_own(tokenizer):
    # encode goes through encode_batch (which releases the GIL): the same ids as encode.
    for text in ["the cat", "naïve café 😀", " lead", "a\nb\tc", "x" * 5000]:
        assert tokenizer.encode(text, add_bos=False) == tokenizer.backend.encode(
            text, add_special_tokens=False).ids


def test_max_token_bytes_bounds_every_token(tokenizer):
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    assert tokenizer.max_token_bytes == longest
    text = "the cat sat on the mat " * 50
    assert len(tokenizer.encode(text, add_bos=False)) >= len(text.encode()) / longest


def test_long_text_is_tokenised_on_the_pool_with_the_same_ids(tokenizer):
    ctx = _context(tokenizer, max_len=100_000)
    text = "a dog ran in the park with a red ball. " * 200
    assert len(text) > INLINE_CHARS
    loop_thread = []

    def encode(t, **kw):
        loop_thread.append(threading.current_thread().name)
        return tokenizer.encode(t, **kw)

    ctx.tokenizer = SimpleNamespace(encode=encode, byte_level=False)
    assert asyncio.run(ctx.encode(text)) == tokenizer.encode(text)
    assert loop_thread[0].startswith("tokenize")
    ctx.close()


def test_too_long_text_is_refused_without_tokenising(tokenizer):
    ctx = _context(tokenizer)
    calls = []
    real = tokenizer.encode
    ctx.tokenizer = SimpleNamespace(encode=lambda *a, **k: calls.append(1) or real(*a, **k),
                                    max_token_bytes=tokenizer.max_token_bytes,
                                    byte_level=True)
    with pytest.raises(ApiError) as err:
        asyncio.run(ctx.encode("x" * (96 * tokenizer.max_token_bytes + 1), field="messages"))
    assert (err.value.status, err.value.param, calls) == (400, "messages", [])
    ctx.close()


def test_tokenizer_queue_is_bounded_and_says_when_to_retry(tokenizer):
    ctx = _context(tokenizer, max_len=100_000, tokenize_queue=2)

    def slow(text, **kw):  # a tokeniser that takes its time, on the pool's thread
        time.sleep(0.3)
        return tokenizer.encode(text, **kw)

    ctx.tokenizer = SimpleNamespace(encode=slow, byte_level=False)
    text = "y" * (INLINE_CHARS + 1)

    async def three():
        return await asyncio.gather(*(ctx.encode(text) for _ in range(3)),
                                    return_exceptions=True)

    results = asyncio.run(three())
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(refused) == 1 and refused[0].status == 503 and refused[0].retry_after >= 1
    assert refused[0].response().headers["retry-after"] == str(refused[0].retry_after)
    assert all(r == tokenizer.encode(text) for r in results if not isinstance(r, ApiError))
    time.sleep(0.4)
    assert asyncio.run(ctx.encode(text)) == tokenizer.encode(text)  # room again
    ctx.close()


def _record(msg: str, exc: type[BaseException] | None = None) -> logging.LogRecord:
    exc_info = (exc, exc(), None) if exc else None
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, exc_info)


def test_repeat_filter_lets_a_burst_through_then_counts():
    now = [0.0]
    repeat = RepeatFilter(burst=3, window_s=10.0, clock=lambda: now[0])
    passed = [repeat.filter(_record("accept failed\nsocket 7", OSError)) for _ in range(100)]
    assert passed == [True] * 3 + [False] * 97
    # Another message, or the same one with another exception, is not a repeat.
    assert repeat.filter(_record("accept failed\nsocket 7", ValueError))
    assert repeat.filter(_record("something else"))
    now[0] = 10.0  # a new window: the next one through says what was dropped
    record = _record("accept failed\nsocket 9", OSError)
    assert repeat.filter(record)
    assert "97 more like this were not logged" in record.getMessage()
