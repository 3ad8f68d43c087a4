"""What every endpoint needs: the engine client, the tokenizer, limits, metrics, and the
checks of a request against the model (vocabulary, positions) that the schema cannot make.

Token text for log-probabilities is spelled as OpenAI spells it: the token's own text, or
``bytes:\\xNN...`` when its bytes are not whole UTF-8 characters.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...runtime.pids import process_alive
from ...runtime.sampling import SamplingError, SamplingParams
from ..client import EngineClient, EngineHealth
from .connections import Guard
from .errors import ApiError, short
from .jobs import RETRY_AFTER_S, Choice, Runner, request_error
from .metrics import ServerMetrics

SAMPLING_EPS = 1e-5
# Texts up to this many characters tokenise in well under a millisecond: on the event loop,
# where a thread hop would cost more than the work.
INLINE_CHARS = 4096


@dataclass(frozen=True)
class ServeLimits:
    """What one client may take; dejavu.toml's [serve] documents each."""

    max_pending: int = 256  # engine requests accepted at once (running + waiting); 429 beyond
    max_body_bytes: int = 4 << 20  # 413 beyond
    chat_max_tokens: int = 256  # a chat completion without max_tokens
    max_connections: int = 1024
    idle_timeout_s: float = 5.0  # keep-alive, between requests
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    tokenize_threads: int = 1
    tokenize_queue: int = 8  # long prompts tokenising or waiting; 503 beyond


class Context:
    def __init__(self, client: EngineClient, tokenizer, model_name: str,
                 limits: ServeLimits = ServeLimits()) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.metrics = ServerMetrics()
        # The HTTP connections' guard: the server's protocol enforces it, /metrics reads it.
        self.guard = Guard(limits.max_connections, limits.header_timeout_s,
                           limits.body_timeout_s)
        self.runner = Runner(client, self.metrics, limits.max_pending, self.health)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._tokenize_pool = ThreadPoolExecutor(limits.tokenize_threads,
                                                 thread_name_prefix="tokenize")
        self._tokenizing = 0  # long prompts submitted to the pool and not yet done
        self._tokenizing_lock = threading.Lock()
        # A byte-level BPE token stands for at most max_token_bytes bytes, and a character
        # is at least one byte: a longer text has more tokens than the model has positions.
        self._max_text_chars = (self.max_len * tokenizer.max_token_bytes
                                if getattr(tokenizer, "byte_level", False) else None)

    @property
    def max_len(self) -> int:
        return self.client.max_len

    @property
    def vocab_size(self) -> int:
        return self.client.vocab_size

    def health(self) -> EngineHealth:
        """The client's verdict, and for a cluster this process started (on this host) a
        direct look at each worker process: a killed worker is seen at once, not when the
        scheduler's next health report arrives."""
        health = self.client.health()
        cluster = getattr(self.client, "cluster", None)
        if not health.ok or cluster is None:
            return health
        gone = [w for w in health.workers
                if isinstance(w.get("pid"), int) and w.get("pid") and not process_alive(w["pid"])]
        if not gone:
            return health
        workers = [dict(w, alive=w not in gone and w.get("alive", False))
                   for w in health.workers]
        detail = "; ".join(f"worker {w.get('worker')} (pid {w['pid']}) is gone" for w in gone)
        return EngineHealth(False, detail, workers)

    # --- requests -----------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {short(name)} is not served here; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    async def encode(self, text: str, field: str = "prompt") -> list[int]:
        """Token ids of a text prompt. A text too long for the model's positions is refused
        without tokenising it; a long one is tokenised on the tokenizer threads (bounded:
        beyond ``tokenize_queue`` at once, 503), so the event loop goes on serving."""
        if not text:
            raise ApiError(400, f"{field} is empty: give some text or token ids", param=field)
        if self._max_text_chars is not None and len(text) > self._max_text_chars:
            raise ApiError(400, f"{field} is {len(text)} characters; the model's {self.max_len} "
                           f"positions hold at most {self._max_text_chars} (a token is at most "
                           f"{self.tokenizer.max_token_bytes} bytes): shorten it", param=field)
        if len(text) <= INLINE_CHARS:
            return self.tokenizer.encode(text)
        with self._tokenizing_lock:
            busy = self._tokenizing >= self.limits.tokenize_queue
            if not busy:
                self._tokenizing += 1
        if busy:
            self.metrics.failures.inc(1, "tokenizer_busy")
            raise ApiError(503, f"server busy: {self.limits.tokenize_queue} long prompts are "
                           "being tokenised; retry later", code="tokenizer_busy",
                           retry_after=RETRY_AFTER_S)
        job = self._tokenize_pool.submit(self.tokenizer.encode, text)
        # Counted down when the thread is done (or the job never started), not when this
        # coroutine is cancelled: a client that leaves does not stop a tokenisation running.
        job.add_done_callback(self._tokenized)
        return await asyncio.wrap_future(job)

    def _tokenized(self, _job) -> None:
        with self._tokenizing_lock:
            self._tokenizing -= 1

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def check_prompt(self, ids: list[int], max_tokens: int, field: str = "prompt",
                     tokens_field: str = "max_tokens") -> None:
        if not ids:
            raise ApiError(400, f"{field} is empty: give at least one token", param=field)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{field}: token id {bad} is outside the vocabulary "
                           f"[0, {self.vocab_size})", param=field)
        if len(ids) >= self.max_len:
            raise ApiError(400, f"{field} has {len(ids)} tokens; the model has "
                           f"{self.max_len} positions and one must stay free to generate",
                           param=field)
        if len(ids) + max_tokens > self.max_len:
            raise ApiError(400, f"{field} tokens ({len(ids)}) + {tokens_field} ({max_tokens}) "
                           f"= {len(ids) + max_tokens} exceeds the model's {self.max_len} "
                           f"positions: lower {tokens_field} to at most "
                           f"{self.max_len - len(ids)}", param=tokens_field)

    def sampling(self, **kwargs) -> SamplingParams:
        # Vanishing temperature or top_p mean "the most likely token": say so exactly.
        # Dividing logits by a temperature like 1e-300 overflows to inf, and a top_p below
        # float32's resolution rounds to 0 and would cut every token (found by fuzzing).
        if 0.0 < kwargs.get("temperature", 0.0) < SAMPLING_EPS:
            kwargs["temperature"] = 0.0
        if kwargs.get("top_p", 1.0) < SAMPLING_EPS:
            kwargs["top_p"] = SAMPLING_EPS
        try:
            return SamplingParams(**kwargs)
        except SamplingError as exc:
            raise request_error(exc) from None

    def choices(self, prompts: list[list[int]], n: int, params: SamplingParams,
                prefix: str) -> list[Choice]:
        """One engine request per (prompt, choice); with a seed, choice j uses seed + j so
        that n > 1 samples differ yet stay reproducible."""
        out = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                chosen = params if seed == params.seed else _replace(params, seed=seed)
                index = p * n + j
                out.append(Choice(index, ids, chosen, f"{prefix}-{index}"))
        return out

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # --- token text ---------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            raw = self.tokenizer.token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, logprob in top:
            key = self.token_text(token_id)
            # Two ids can spell the same text (partial bytes): keep the likelier.
            if key not in out or logprob > out[key]:
                out[key] = logprob
        return out


class Offsets:
    """Character offsets of tokens in the text they decode to: special tokens are not
    rendered (width 0) and a character split over tokens starts at the token that ends it."""

    def __init__(self, tokenizer, start: int = 0) -> None:
        self.tokenizer = tokenizer
        self.position = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> int:
        at = self.position
        if token_id not in self.tokenizer.special_ids:
            self.position += len(self._utf8.decode(self.tokenizer.token_bytes(token_id)))
        return at


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    from dataclasses import replace

    return replace(params, **changes)
