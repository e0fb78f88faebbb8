"""Chat templates rendered in a sandboxed jinja2 environment.

Templates ship inside checkpoints, so they are untrusted input: the immutable
sandbox refuses attribute access to internals and mutation of passed objects;
any failure is a ConfigError naming the template's origin.

jinja2's sandbox answers an unsafe attribute (``''.__class__``) with an undefined
value that renders as nothing and only fails when used further; ours raises at
the access, so a template probing for an escape is refused, not half-rendered.
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


def _sandbox():
    """The immutable sandbox, raising on unsafe attribute access (built lazily:
    importing this module must not import jinja2)."""
    global _SANDBOX
    if _SANDBOX is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        class StrictSandbox(ImmutableSandboxedEnvironment):
            def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
                raise SecurityError(
                    f"access to attribute {attribute!r} of "
                    f"{type(obj).__name__!r} object is unsafe"
                )

        _SANDBOX = StrictSandbox
    return _SANDBOX


_SANDBOX: Any = None


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

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"message {i} needs 'role' and 'content' keys, got {m!r}")
    env = _sandbox()(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        tmpl = env.from_string(template or FALLBACK_TEMPLATE)
        return tmpl.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except ConfigError:
        raise
    except TemplateError as e:
        raise ConfigError(f"chat template of {origin} failed: {e}") from None
    except Exception as e:  # a template may raise anything from a filter
        raise ConfigError(
            f"chat template of {origin} failed: {type(e).__name__}: {e}"
        ) from None
