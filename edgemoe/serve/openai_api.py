"""OpenAI's request and response shapes, as llama-server reads and writes them.

``parse_*`` turn a request's JSON into the prompt (messages or text) and one
``SamplingParams``, or raise ``ApiError`` naming the field; the ``*_response``
and ``*_chunk`` functions build the JSON the clients expect. No HTTP here.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.sampling_params import SamplingParams

MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""

FINISH = {"stop": "stop", "length": "length", "context": "length"}
"""The engine's finish reasons as OpenAI spells them."""


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind, self.code = kind, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Parsed:
    prompt: Any
    """Chat messages, or the completion's text or token ids."""
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    quality: str | None


# Fields that change what OpenAI would return and that EdgeMoE does not do:
# refused by name rather than silently ignored.
_UNSUPPORTED = {
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v not in (None, ""),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
}


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a number, got {v!r}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be in [{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {v}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {v!r}", name)
    return v


def _common(body: Any, max_tokens_limit: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, refused in _UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise ApiError(400, f"{name} is not supported by this server", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", "model")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(
            400, f"stop must be a string or a list of strings, got {stop!r}", "stop"
        )
    if len(stop) > MAX_STOP or not all(stop):
        raise ApiError(400, f"stop takes 1 to {MAX_STOP} non-empty strings", "stop")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, name, 1, max_tokens_limit)
    quality = body.get("quality")
    if quality is not None and not isinstance(quality, str):
        raise ApiError(400, f"quality must be a string, got {quality!r}", "quality")
    fields = dict(
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 1 << 20),
        min_p=_number(body, "min_p", 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 100.0),
        seed=_int(body, "seed", 0, 2**64 - 1),
    )
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("top_p") == 0.0:  # OpenAI allows 0: the likeliest token only
        fields["top_p"], fields["temperature"] = 1.0, 0.0
    try:
        params = SamplingParams(
            max_tokens=max_tokens or max_tokens_limit,
            stop=stop,
            ignore_eos=_bool(body, "ignore_eos"),
            **fields,
        )
    except ConfigError as e:
        raise ApiError(400, str(e)) from None
    return dict(
        params=params,
        max_tokens_given=max_tokens is not None,
        stream=_bool(body, "stream"),
        include_usage=bool(so and so.get("include_usage")),
        quality=quality,
    )


def parse_chat(body: Any, max_tokens_limit: int) -> Parsed:
    common = _common(body, max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a role", where)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400, f"{where}.content: only text parts are supported", where
                )
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(
                400, f"{where}.content must be a string, got {content!r}", where
            )
        out.append({"role": m["role"], "content": content})
    return Parsed(prompt=out, **common)


def parse_completion(body: Any, max_tokens_limit: int) -> Parsed:
    common = _common(body, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok_ids = (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise ApiError(
            400, "prompt must be a non-empty string or a list of token ids", "prompt"
        )
    return Parsed(prompt=prompt, **common)


# -- responses -------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # OpenAI's field: prompt tokens served from the cache, not evaluated.
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_response(
    rid, model, text, finish, prompt_tokens, completion_tokens, cached=0
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH.get(finish, finish),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }


def chat_chunk(rid, model, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": FINISH.get(finish, finish) if finish else None,
            }
        ],
    }


def completion_response(
    rid, model, text, finish, prompt_tokens, completion_tokens, cached=0
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": FINISH.get(finish, finish),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }


def completion_chunk(rid, model, text: str, finish: str | None = None) -> dict:
    body = completion_response(rid, model, text, finish, 0, 0)
    del body["usage"]
    if not finish:
        body["choices"][0]["finish_reason"] = None
    return body


def usage_chunk(
    rid, model, kind: str, prompt_tokens: int, completion_tokens: int, cached=0
) -> dict:
    """``stream_options.include_usage``: a last chunk with no choices."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }
