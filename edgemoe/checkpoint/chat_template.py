"""Chat templates rendered in a sandboxed jinja2 environment.

Templates ship inside checkpoints, so they are untrusted input: the immutable
sandbox (template_sandbox.py) refuses attribute access to internals, mutation
of passed objects, and work or output past its time and size limits; any
failure is a ConfigError naming the template's origin.
"""

from __future__ import annotations

import datetime
from typing import Any

from edgemoe.errors import ConfigError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
"""ChatML, what llama.cpp also falls back to when a model has no template."""


def _raise(message: str) -> None:
    raise ConfigError(f"chat template refused the conversation: {message}")


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    origin: str = "model",
    **variables: Any,
) -> str:
    """The prompt text for ``messages`` (``[{"role", "content"}, ...]``)."""
    from jinja2 import TemplateError

    from edgemoe.checkpoint.template_sandbox import (
        Budget,
        TemplateLimit,
        render_limited,
    )

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"message {i} needs 'role' and 'content' keys, got {m!r}")

    def strftime(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    try:
        return render_limited(
            template or FALLBACK_TEMPLATE,
            Budget(),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            _globals={"raise_exception": _raise, "strftime_now": strftime},
            **variables,
        )
    except ConfigError:
        raise
    except TemplateLimit as e:
        raise ConfigError(f"chat template of {origin} refused: {e}") from None
    except TemplateError as e:
        raise ConfigError(f"chat template of {origin} failed: {e}") from None
    except Exception as e:  # a template may raise anything from a filter
        raise ConfigError(
            f"chat template of {origin} failed: {type(e).__name__}: {e}"
        ) from None
