"""Mutators for safetensors files and chat templates (see mutate.py for the
byte, GGUF and JSON ones these build on)."""

from __future__ import annotations

import json
import random
import struct

from mutate import dumps, edge_value, flip_bytes, mutate_json_obj, truncate

# ------------------------------------------------------------------------- safetensors


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The 8-byte header length, the JSON header's entries, or the bytes."""
    (hlen,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + hlen])
    body = data[8 + hlen :]
    r = rng.random()
    if r < 0.2:
        new = edge_value(rng, hlen, 8)
        return new.to_bytes(8, "little") + data[8:], f"header_len={new}"
    if r < 0.6:  # one tensor entry: dtype, shape or data_offsets
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        ent = header[name]
        a, b = ent["data_offsets"]
        val = {
            "dtype": [
                "F32",
                "F16",
                "BF16",
                "I8",
                "U8",
                "F64",
                "I64",
                "BOOL",
                "F8_E4M3",
                "Q4",
                "",
                7,
            ],
            "shape": [
                [],
                [0],
                [-1],
                [2**62],
                [2**32, 2**32],
                ent["shape"][::-1],
                ent["shape"] + [1],
                [1.5],
                ["8"],
                [ent["shape"][0] + 1] + ent["shape"][1:],
                None,
            ],
            "data_offsets": [
                [b, a],
                [a, a],
                [a, b + 1],
                [a, 2**63],
                [-1, b],
                [a, len(body) + 1],
                [2**64, 2**64 + 8],
                [a],
                [a, b, 0],
                [0.5, b],
                None,
            ],
        }[field]
        ent[field] = rng.choice(val)
        text = json.dumps(header).encode()
        return struct.pack(
            "<Q", len(text)
        ) + text + body, f"st.{name}.{field}={ent[field]!r}"[:160]
    if r < 0.8:
        obj, what = mutate_json_obj(header, rng)
        text = dumps(obj).encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(text)) + text + body, "st.header " + what
    if r < 0.9:
        return truncate(data, rng)
    return flip_bytes(data, rng, 0, 8 + hlen)


# --------------------------------------------------------------------------- templates

# fmt: off
_EXPLOSIVE = [
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ '%999999999d' % 1 }}", "{{ '%.999999999f' % 1.0 }}", "{{ 'x' * 1000000000 }}",
    "{{ 2 ** 99999999 }}", "{{ 10 ** 10 ** 10 }}", "{{ (range(10**12)|list)|length }}",
    "{{ '{:999999999}'.format(1) }}", "{{ 'x'|center(1000000000) }}",
    "{{ 'x'|indent(1000000000) }}", "{{ [1] * 100000000 }}",
    "{{ 'ab'|wordwrap(1) * 100000000 }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ undefined_name.attr }}",
    "{{ undefined_fn() }}", "{{ messages[99] }}", "{{ messages.append(1) }}",
    "{{ ''.__class__.__mro__ }}", "{{ raise_exception('nope') }}",
    "{{ strftime_now('%Y' * 1000000) }}", "{{ messages|map(attribute='zzz')|join }}",
    "{{ 1 / 0 }}", "{{ 1 // 0 }}", "{{ 'a' < 1 }}",
    "{{ messages|tojson(indent=1000000000) }}", "{{ x|format(**{}) }}",
    "{{ range(-1)|first }}", "{{ 'x'|truncate(-1) }}", "{{ 1.0e308 * 10 }}",
    "{{ (2**64)|string }}", "{{ 'é'|urlencode }}",
    "{% set ns = namespace(a=1) %}{% for i in range(1000000) %}"
    "{% set ns.a = ns.a * 2 %}{% endfor %}{{ ns.a }}",
    "{{ lipsum(1000000000) }}", "{{ cycler(1,2).__init__ }}", "{{ self.__dict__ }}",
    "{{ 'x' ~ messages ~ messages * 1000 }}", "{{ '%s' % ('x' * 10000000) }}",
]
# fmt: on
# fmt: off
_SYNTAX = [
    "{%", "{{", "%}", "}}", "{% endfor %}", "{% if %}", "{#", "{% for %}", "{{ }}",
    "{% raw %}", "{% extends 'x' %}", "{% include 'x' %}", "{% import 'x' as y %}",
]
# fmt: on


def mutate_template(template: str, rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.35:
        bit = rng.choice(_EXPLOSIVE)
        i = rng.randrange(len(template) + 1)
        # Insert at a tag boundary most of the time (valid syntax); anywhere else
        # produces the syntax errors the renderer must also name.
        if rng.random() < 0.7:
            i = rng.choice([0, len(template)])
        return template[:i] + bit + template[i:], f"tpl.insert {bit[:60]!r}@{i}"
    if r < 0.55:  # nest the whole template in loops: work multiplies per level
        depth, width = rng.randint(1, 6), rng.choice([10, 100, 1000, 10**6])
        head = "".join(f"{{% for i{d} in range({width}) %}}" for d in range(depth))
        return head + template + "{% endfor %}" * depth, f"tpl.nest {depth}x{width}"
    if r < 0.75:
        tok = rng.choice(_SYNTAX)
        i = rng.randrange(len(template) + 1)
        return template[:i] + tok + template[i:], f"tpl.syntax {tok!r}@{i}"
    if r < 0.9:
        i = rng.randrange(len(template) or 1)
        k = rng.randint(1, 20)
        op = rng.choice(["del", "dup"])
        if op == "del":
            return template[:i] + template[i + k :], f"tpl.delete{k}@{i}"
        return template[:i] + template[i : i + k] * rng.choice([2, 50]) + template[
            i:
        ], f"tpl.dup{k}@{i}"
    return rng.choice(
        ["", "{{", "x" * 100000, "{{ messages }}", "\udcff", "{% for m in messages %}"]
    ), "tpl.replace"
