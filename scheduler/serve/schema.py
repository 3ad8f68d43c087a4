"""The OpenAI-compatible request bodies, as pydantic models that validate once, at the door.

Static checks live here (types, ranges, NaN/infinity, unknown fields), so that the OpenAPI
schema documents them and a bad request is a 400 naming the field before anything is
queued. Checks that need the model (vocabulary, positions) are made in ``context.py``.

Beyond OpenAI's fields: ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos`` (as
vLLM has them). Fields OpenAI has but this server cannot honour (logit_bias, best_of != n,
suffix) are accepted only at their neutral value and refused otherwise, rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

MAX_STOP = 16  # SamplingParams' own limit
MAX_STOP_CHARS = 256
MAX_CHOICES = 64  # prompts x n in one request
MAX_TOKENS_CAP = 1 << 20  # static bound; the model's positions give the real one



def _utf8(text: str) -> str:
    # JSON can carry a lone UTF-16 surrogate ("\\ud800"): a Python str, but no UTF-8 text,
    # so the tokenizer (and every response that echoes it) would fail on it later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate at character {exc.start}; "
                         "send valid Unicode text") from None
    return text


# Every string of a request body: exactly a str (no coercion) that is valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_utf8)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


class _Body(BaseModel):
    # Unknown fields are errors (a typo must not silently fall back to a default); NaN and
    # infinity are refused in every float field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: Text | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=1 << 20)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Stop = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stream: StrictBool = False  # "yes" or 1 is a 400, not true
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: Text | None = None
    # OpenAI's ranges; repetition_penalty and min_p as vLLM takes them (SamplingParams'
    # own bounds: a value it would refuse never gets past the door).
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.1, le=10.0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    def penalties(self) -> dict[str, float]:
        """The penalty fields as SamplingParams arguments (unset: neutral)."""
        return {"repetition_penalty": _or(self.repetition_penalty, 1.0),
                "frequency_penalty": _or(self.frequency_penalty, 0.0),
                "presence_penalty": _or(self.presence_penalty, 0.0),
                "min_p": _or(self.min_p, 0.0)}

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


Prompt = (
    Text
    | Annotated[list[TokenId], Field(max_length=1 << 20)]
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]
    | Annotated[list[list[TokenId]], Field(min_length=1, max_length=MAX_CHOICES)]
)


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS_CAP)] | None = 16
    echo: StrictBool = False
    # The number of most likely alternatives to return per token (0 = only the chosen one).
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    suffix: Annotated[Text, Field(max_length=0)] | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"only best_of == n is supported (n is {n})")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
