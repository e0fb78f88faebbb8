"""The generation loop (runtime/engine.py), chat templates and ``Model.eval``.

Most engine tests drive ``generate`` with a scripted model: it has the trained
fixture's real tokenizer but "predicts" a fixed token sequence (one-hot logits),
so what the loop emits is known exactly. The eval tests use the fixture model.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import edgemoe
from edgemoe.checkpoint.chat_template import FALLBACK_TEMPLATE, render_chat
from edgemoe.checkpoint.tokenizer import HFTokenizer
from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.runtime.engine import generate

EOS = 0  # the fixture's <|endoftext|>
TEXT = "Hello world, this is a test"
UNICODE = "café 🎉 naïve — 日本 ✓ Ünïcödé"


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return HFTokenizer(fixture_dir, eos_ids=(EOS,), bos_id=EOS)


class ScriptedModel:
    """What ``generate`` needs of a Model; "predicts" ``script`` token by token."""

    def __init__(self, tokenizer, script, n_ctx=512, eos_ids=(EOS,)):
        self.tokenizer = tokenizer
        self.script = list(script)
        self.n_ctx = self.n_pos = n_ctx
        self.spec = SimpleNamespace(eos_token_ids=tuple(eos_ids), n_ctx_train=n_ctx)
        self.n_past = 0
        self.step = 0
        self.prompts: list[list[int]] = []

    def tokenize(self, text, add_special=True):
        return self.tokenizer.encode(text, add_special)

    def reset(self):
        self.n_past = 0
        self.step = 0

    def eval(self, ids):
        ids = list(ids)
        if self.n_past == 0:
            self.prompts.append(ids)
        self.n_past += len(ids)
        if self.n_past > self.n_ctx:
            raise ContextOverflowError("scripted model: past the context")
        logits = np.full(self.tokenizer.vocab_size, -5.0, dtype=np.float32)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 5.0
        self.step += 1
        return logits


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special=False)


def run(model, prompt="x", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", len(model.script))
    return list(generate(model, prompt, **kw))


def text_of(responses):
    return "".join(r.text for r in responses)


# -- plain generation, length and EOS -----------------------------------------------


def test_emits_the_scripted_text_and_stops_at_max_tokens(tokenizer):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script))
    assert [r.token for r in out] == script
    assert text_of(out) == TEXT
    assert [r.finish_reason for r in out] == [None] * (len(script) - 1) + ["length"]
    assert out[-1].timings.generation_tokens == len(script)


@pytest.mark.parametrize("max_tokens", [1, 3, 6])
def test_finish_reason_length(tokenizer, max_tokens):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), max_tokens=max_tokens)
    assert len(out) == max_tokens
    assert out[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in out[:-1])
    assert text_of(out) == tokenizer.decode(script[:max_tokens])


def test_sampling_params_and_their_overrides(tokenizer):
    """One ``SamplingParams`` drives generation; fields given by name override
    it, and a misspelt name is refused rather than ignored."""
    from edgemoe.errors import ConfigError
    from edgemoe.sampling_params import SamplingParams

    script = ids_of(tokenizer, TEXT)
    params = SamplingParams(max_tokens=3, temperature=0, stop=("never",))
    out = list(generate(ScriptedModel(tokenizer, script), "x", params))
    assert [r.token for r in out] == script[:3]
    out = list(generate(ScriptedModel(tokenizer, script), "x", params, max_tokens=5))
    assert [r.token for r in out] == script[:5]
    assert params.max_tokens == 3  # the caller's params are not changed
    with pytest.raises(ConfigError, match=r"\['max_token'\]"):
        list(generate(ScriptedModel(tokenizer, script), "x", params, max_token=5))


def test_max_tokens_zero_yields_one_final_response(tokenizer):
    out = run(ScriptedModel(tokenizer, [5]), max_tokens=0)
    assert [(r.text, r.token, r.finish_reason) for r in out] == [("", None, "length")]


def test_length_flushes_text_held_back_for_a_stop_string(tokenizer):
    # "Hel" "lo" " w" "or": " wor" could begin "world!", so it is held back,
    # and must still be emitted when max_tokens ends generation.
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), max_tokens=4, stop=["world!"])
    assert text_of(out) == "Hello wor"
    assert out[-1].finish_reason == "length"


@pytest.mark.parametrize("where", ["spec", "tokenizer"])
def test_eos_ends_generation(tokenizer, where):
    eos = EOS if where == "tokenizer" else 5
    script = [*ids_of(tokenizer, "Hello"), eos, *ids_of(tokenizer, " world")]
    model = ScriptedModel(tokenizer, script, eos_ids=(5,) if where == "spec" else ())
    out = run(model, max_tokens=10)
    assert [r.token for r in out] == script[:3]
    assert out[-1].finish_reason == "stop"
    assert text_of(out) == "Hello"
    assert out[-1].timings.generation_tokens == 2  # EOS is not counted


def test_ignore_eos_keeps_generating(tokenizer):
    script = [*ids_of(tokenizer, "Hello"), EOS, *ids_of(tokenizer, " world")]
    out = run(ScriptedModel(tokenizer, script), ignore_eos=True)
    assert [r.token for r in out] == script
    assert out[-1].finish_reason == "length"
    assert text_of(out) == "Hello world"  # EOS decodes to nothing


def test_eos_flushes_text_held_back_for_a_stop_string(tokenizer):
    script = [*ids_of(tokenizer, "Hello"), EOS]  # "Hel" "lo"
    out = run(ScriptedModel(tokenizer, script), max_tokens=10, stop=["lo wor"])
    assert text_of(out) == "Hello"
    assert out[-1].finish_reason == "stop"


def test_context_full_ends_generation(tokenizer):
    script = ids_of(tokenizer, TEXT)
    prompt = ids_of(tokenizer, "a b c")
    model = ScriptedModel(tokenizer, script, n_ctx=len(prompt) + 3)
    out = run(model, prompt, max_tokens=50)
    assert out[-1].finish_reason == "context"
    assert len(out) == 4  # the last one is sampled but never evaluated
    assert text_of(out) == tokenizer.decode(script[:4])


# -- stop strings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop, expected",
    [
        ("world", "Hello "),
        ("lo wor", "Hel"),  # spans "Hel" "lo" " w" "or"
        ("s is a", "Hello world, thi"),  # starts inside " this"
        ("Hel", ""),
        ("test", "Hello world, this is a "),
    ],
    ids=["one_token", "across_tokens", "mid_token", "at_start", "at_end"],
)
def test_stop_string(tokenizer, stop, expected):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), stop=[stop])
    assert text_of(out) == expected
    assert out[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in out[:-1])
    assert stop not in text_of(out)


def test_stop_string_absent_changes_nothing(tokenizer):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), stop=["tests", "Hello!", "xyz"])
    assert text_of(out) == TEXT
    assert out[-1].finish_reason == "length"


def test_a_single_stop_string_is_not_a_set_of_characters(tokenizer):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), stop="world")
    assert text_of(out) == "Hello "
    assert text_of(run(ScriptedModel(tokenizer, script), stop=None)) == TEXT


@pytest.mark.parametrize(
    "stop", [[""], ["ok", ""], [3], 5], ids=["empty", "one_empty", "int", "not_a_list"]
)
def test_invalid_stop_strings_raise(tokenizer, stop):
    with pytest.raises(ConfigError, match="stop"):
        run(ScriptedModel(tokenizer, [5]), stop=stop)


@pytest.mark.parametrize("order", [1, -1], ids=["listed_first", "listed_last"])
def test_earliest_stop_string_wins(tokenizer, order):
    script = ids_of(tokenizer, TEXT)
    out = run(ScriptedModel(tokenizer, script), stop=["test", "world"][::order])
    assert text_of(out) == "Hello "


@pytest.mark.parametrize("order", [1, -1], ids=["listed_first", "listed_last"])
def test_earliest_stop_string_wins_within_one_token(tokenizer, order):
    # " test" is one token: both stops complete in the same step.
    script = ids_of(tokenizer, TEXT)
    assert tokenizer.decode([script[-1]]) == " test"
    out = run(ScriptedModel(tokenizer, script), stop=["st", "te"][::order])
    assert text_of(out) == "Hello world, this is a "
    assert out[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "stop, expected",
    [("🎉", "café "), ("ï", "café 🎉 na"), ("日本", "café 🎉 naïve — ")],
    ids=["emoji", "accent", "cjk"],
)
def test_stop_string_with_multibyte_characters(tokenizer, stop, expected):
    script = ids_of(tokenizer, UNICODE)
    out = run(ScriptedModel(tokenizer, script), stop=[stop])
    assert text_of(out) == expected
    assert out[-1].finish_reason == "stop"


# -- incremental detokenization -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [UNICODE, "🎉🎉 x 🎉", "ééé\n日本語 " + TEXT],
    ids=["mixed", "emoji_runs", "accents_cjk_ascii"],
)
def test_detokenizer_never_emits_replacement_characters(tokenizer, text):
    script = ids_of(tokenizer, text)
    # The characters really are split across tokens.
    assert any("\ufffd" in tokenizer.decode([t]) for t in script)
    out = run(ScriptedModel(tokenizer, script))
    chunks = [r.text for r in out]
    assert not any("\ufffd" in c for c in chunks), chunks
    assert "".join(chunks) == text


def test_detokenizer_keeps_spaces_between_tokens(tokenizer):
    text = "def f(x):\n    return  x  +  1\n"
    out = run(ScriptedModel(tokenizer, ids_of(tokenizer, text)))
    assert text_of(out) == text


# -- prompts and options -------------------------------------------------------------


def test_chat_messages_go_through_the_template(tokenizer):
    model = ScriptedModel(tokenizer, ids_of(tokenizer, "ok"))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    run(model, messages)
    expected = "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert tokenizer.apply_chat_template(messages) == expected
    assert model.prompts == [ids_of(tokenizer, expected)]


def test_text_and_token_prompts(tokenizer):
    model = ScriptedModel(tokenizer, [5])
    run(model, "Hello world", max_tokens=1)
    run(model, [7, 8, 9], max_tokens=1)
    assert model.prompts == [tokenizer.encode("Hello world"), [7, 8, 9]]


@pytest.mark.parametrize(
    "prompt, kw, error",
    [
        ("", {}, ConfigError),
        ([], {}, ConfigError),
        (3.5, {}, ConfigError),
        ([{"role": "user"}], {}, ConfigError),
        ("hi", {"max_tokens": -1}, ConfigError),
        ("hi", {"temperature": -1.0}, ConfigError),
        ("hi", {"top_p": 0.0}, ConfigError),
        (list(range(1, 40)), {}, ContextOverflowError),
    ],
    ids=[
        "empty_text",
        "empty_ids",
        "not_a_prompt",
        "message_without_content",
        "negative_max_tokens",
        "negative_temperature",
        "zero_top_p",
        "prompt_over_context",
    ],
)
def test_bad_arguments_raise(tokenizer, prompt, kw, error):
    with pytest.raises(error):
        run(ScriptedModel(tokenizer, [5], n_ctx=32), prompt, **kw)


# -- chat template sandbox ------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]

ESCAPES = {
    "mro": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "class": "{{ ''.__class__ }}",
    "messages_class": "{{ messages.__class__.__base__ }}",
    "globals": "{{ cycler.__init__.__globals__.os }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'] }}",
    "self_context": "{{ self._TemplateReference__context }}",
    "format_self": "{{ ''.format.__self__.__class__ }}",
    "list_append": "{% set _ = messages.append(1) %}x",
    "dict_update": "{{ messages[0].update({'role': 'system'}) }}",
}


@pytest.mark.parametrize("template", ESCAPES.values(), ids=ESCAPES.keys())
def test_template_escapes_raise_config_error(template):
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(ConfigError, match="chat template"):
        render_chat(template, messages, origin="evil")
    assert messages == MESSAGES  # nothing was mutated


def test_raise_exception_in_a_template():
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('x') }}{% endif %}"
    )
    with pytest.raises(ConfigError, match="x"):
        render_chat(template, MESSAGES)
    assert render_chat(template, [{"role": "system", "content": "s"}]) == ""


def test_ordinary_templates_still_render():
    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m['role'] | upper }}:{{ m['content'].strip().split(' ')[0] }}"
        "{% if not loop.last %}|{% endif %}{% endfor %}"
        "{% if tools is defined and tools %}T{% endif %}"
        "{{ '#' ~ ns.n }}{{ bos_token }}"
    )
    messages = [
        {"role": "user", "content": " hello there"},
        {"role": "assistant", "content": "yes"},
    ]
    assert (
        render_chat(template, messages, bos_token="<s>")
        == "USER:hello|ASSISTANT:yes#2<s>"
    )
    assert render_chat(None, MESSAGES) == render_chat(FALLBACK_TEMPLATE, MESSAGES)
    assert render_chat(None, MESSAGES).endswith("<|im_start|>assistant\n")


def test_template_from_the_checkpoint_is_sandboxed(fixture_dir, tmp_path):
    """An escape in tokenizer_config.json fails generate() with a ConfigError."""
    shutil.copy(fixture_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((fixture_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ESCAPES["subclasses"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(tmp_path, eos_ids=(EOS,))
    with pytest.raises(ConfigError, match="chat template"):
        run(ScriptedModel(tok, [5]), MESSAGES)


# -- the real model: eval paths and a stop string on real output -----------------------

IDS = np.random.default_rng(5).integers(1, 4096, size=21).tolist()


@pytest.fixture(scope="module")
def model(fixture_dir):
    with edgemoe.load(fixture_dir, n_ctx=64) as m:
        yield m


@pytest.fixture(scope="module")
def full_logits(model):
    out = model.logits(IDS)
    assert out.shape == (len(IDS), 4096)
    assert np.abs(out).max() > 1.0
    return out


@pytest.mark.parametrize("n_prefill", [1, 5, 13])
def test_incremental_decode_matches_full_sequence(model, full_logits, n_prefill):
    model.reset()
    prefill = model.eval(IDS[:n_prefill], all_logits=True)
    np.testing.assert_allclose(prefill, full_logits[:n_prefill], rtol=0, atol=1e-4)
    steps = [model.eval([t]) for t in IDS[n_prefill:]]
    assert model.n_past == len(IDS)
    np.testing.assert_allclose(
        np.stack(steps), full_logits[n_prefill:], rtol=0, atol=1e-4
    )


def test_eval_returns_last_position_by_default(model, full_logits):
    model.reset()
    last = model.eval(IDS[:9])
    assert last.shape == (4096,)
    np.testing.assert_allclose(last, full_logits[8], rtol=0, atol=1e-4)


def test_prompt_longer_than_n_batch(fixture_dir, full_logits):
    with edgemoe.load(fixture_dir, n_ctx=64, n_batch=8) as m:
        assert len(IDS) > 2 * 8 and len(IDS) % 8  # three chunks, one partial
        np.testing.assert_allclose(m.logits(IDS), full_logits, rtol=0, atol=1e-4)
        m.reset()
        np.testing.assert_allclose(m.eval(IDS), full_logits[-1], rtol=0, atol=1e-4)


def test_cached_prefix_is_kept_and_matches_a_fresh_pass(model, full_logits):
    """A prompt that extends, repeats or diverges from the cached sequence
    evaluates only what differs, with the logits of a fresh pass."""
    model.reset()
    model.eval(IDS[:9])
    assert model.reuse_prefix(IDS) == 9 and model.n_past == 9
    np.testing.assert_allclose(model.eval(IDS[9:]), full_logits[-1], atol=1e-4)
    # The same prompt again: all but its last token are kept.
    assert model.reuse_prefix(IDS) == len(IDS) - 1
    np.testing.assert_allclose(model.eval(IDS[-1:]), full_logits[-1], atol=1e-4)
    # A prompt that differs at position 5 keeps 5 tokens.
    other = [*IDS[:5], (IDS[5] + 1) % 4096, *IDS[6:]]
    assert model.reuse_prefix(other) == 5
    reused = model.eval(other[5:])
    np.testing.assert_allclose(reused, model.logits(other)[-1], atol=1e-4)
    model.reset()
    assert model.reuse_prefix(IDS) == 0
    model.eval(IDS[:4])
    with pytest.raises(
        ConfigError, match=r"token ids must be integers, got 'a' at index 1"
    ):
        model.reuse_prefix([IDS[0], "a"])
    assert model.n_past == 4  # a bad prompt leaves the cache as it was


def test_generate_reports_cached_prompt_tokens(model):
    model.reset()
    (first,) = list(model.generate(IDS[:9], max_tokens=1, temperature=0))
    assert (first.timings.cached_tokens, first.timings.prompt_tokens) == (0, 9)
    *_, last = model.generate(IDS, max_tokens=2, temperature=0)
    assert (last.timings.cached_tokens, last.timings.prompt_tokens) == (9, 12)


def test_stop_string_on_real_model_output(model):
    prompt = "def main("
    free = list(model.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True))
    chunks = [r.text for r in free]
    full = "".join(chunks)
    # A stop string made of the end of one chunk and the start of the next.
    k = next(
        i
        for i in range(2, len(chunks) - 1)
        if len(chunks[i]) >= 2 and len(chunks[i + 1]) >= 2
    )
    stop = chunks[k][-2:] + chunks[k + 1][:2]
    cut = full.find(stop)
    out = list(
        model.generate(
            prompt, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]
        )
    )
    assert "".join(r.text for r in out) == full[:cut]
    assert out[-1].finish_reason == "stop"
