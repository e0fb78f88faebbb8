"""Chat templates of the families we run, rendered in our sandbox against
transformers' own renderer on the same conversations.

``data/gpt-oss.jinja`` is gpt-oss's published chat template (the harmony
format), as llama.cpp keeps it for its tests
(``models/templates/openai-gpt-oss-120b.jinja``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.checkpoint.chat_template import render_chat

DATA = Path(__file__).parent / "data"

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 2 + 2?"}],
    "system and history": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
    ],
    "developer": [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("effort", [None, "high"])
def test_gpt_oss_harmony_template_renders_as_transformers_does(name, effort):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (DATA / "gpt-oss.jinja").read_text()
    messages = CONVERSATIONS[name]
    extra = {"reasoning_effort": effort} if effort else {}
    ours = render_chat(template, messages, origin="gpt-oss", **extra)
    (theirs,), _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=True, **extra
    )
    assert ours == theirs
    assert ours.startswith("<|start|>system<|message|>")
    assert ours.endswith("<|start|>assistant")
    assert f"Reasoning: {effort or 'medium'}" in ours
