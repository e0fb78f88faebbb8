"""Chat templates are untrusted input: bounded in time, output and sizes.
Each hostile template below hung the process or allocated gigabytes before
the limits; now each is refused, quickly, with a typed error."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from edgemoe.checkpoint.chat_template import FALLBACK_TEMPLATE, render_chat
from edgemoe.errors import ConfigError

MSGS = [{"role": "user", "content": "hi"}]

HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "percent star": "{{ '%*d' % (999999999, 1) }}",
    "format filter": "{{ '%0999999999d'|format(1) }}",
    "brace width": "{{ '{:999999999}'.format(1) }}",
    "brace nested": "{{ '{:{w}}'.format(1, w=999999999) }}",
    "center": "{{ 'x'|center(1000000000) }}",
    "indent": "{{ 'x\\ny'|indent(1000000000) }}",
    "big power": "{{ 10 ** (10 ** 10) }}",
    "big product": "{{ 'x' * 1000000000 }}",
    "list product": "{{ ([1] * 100000) * 100000 }}",
    "output bomb": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "cycle": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ loop.cycle(*range(3)) if false }}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused_quickly(name):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="chat template of fuzz refused"):
        render_chat(HOSTILE[name], MSGS, origin="fuzz")
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{{ '%05d' % 42 }}", "00042"),
        ("{{ '{:>6}'.format('ab') }}", "    ab"),
        ("{{ 'ab'|center(6) }}", "  ab  "),
        ("{{ 2 ** 100 }}", str(2**100)),
        ("{% for i in range(3)|reverse %}{{ i }}{% endfor %}", "210"),
        ("{{ range(5)|length }}{{ range(5)|list|last }}", "54"),
        ("{{ 'ab' * 3 }}", "ababab"),
    ],
)
def test_ordinary_templates_still_render(template, expected):
    assert render_chat(template, MSGS) == expected


def test_fallback_template_renders():
    assert "hi" in render_chat(FALLBACK_TEMPLATE, MSGS)


def test_cli_names_the_template_limit(converted_fixture, tmp_path, cli):
    model = tmp_path / "model"
    shutil.copytree(converted_fixture, model)
    path = model / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["chat_template"] = HOSTILE["nested loops"]
    path.write_text(json.dumps(cfg))
    proc = cli("run", model, "-p", "hi", "--chat", "-n", "1", timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "longer than" in lines[0], proc.stderr
