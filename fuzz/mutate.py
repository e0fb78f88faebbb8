"""Seeded, deterministic mutators for EdgeMoE's input formats.

Every mutator takes a ``random.Random`` and returns new bytes/text plus a short
description (the description goes into the report, so a finding says *what* was
changed, not only which case number). Random byte noise rarely gets past a
magic number or a JSON parser, so most mutators are structural: they know where
GGUF keeps its counts, lengths and types, where safetensors keeps its header
length, and which JSON node to replace with a hostile value.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------- bytes

# Values that break size arithmetic: zero, one, sign bits, all-ones, and the
# 2**31/2**32 edges where a C int or size_t product overflows.
# fmt: off
_EDGE64 = [
    0, 1, 2, 3, 255, 256, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
    2**63, 2**64 - 1,
]
# fmt: on


def edge_value(rng: random.Random, old: int, width: int) -> int:
    """An interesting unsigned value for a ``width``-byte field holding ``old``."""
    top = 2 ** (8 * width) - 1
    pool = [v for v in _EDGE64 if v <= top] + [top, top >> 1, (top >> 1) + 1]
    pool += [
        old + 1,
        old - 1,
        old * 2,
        old << 8,
        old + 2**20,
        rng.getrandbits(8 * width),
    ]
    return rng.choice(pool) & top


def flip_bytes(
    data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None
) -> tuple[bytes, str]:
    """1-8 random bytes in ``[lo, hi)`` replaced (a bit flip, 0x00 or 0xff)."""
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    if hi <= lo:
        return bytes(buf), "flip(none)"
    where = []
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, hi)
        buf[i] = rng.choice(
            [buf[i] ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)]
        )
        where.append(i)
    return bytes(buf), f"flip@{where}"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    # Short files are the common real-world corruption (an interrupted download);
    # bias towards cuts in the header, where the parsers do their bookkeeping.
    n = len(data)
    cut = rng.choice(
        [
            0,
            1,
            4,
            8,
            16,
            24,
            rng.randrange(min(n, 65536) or 1),
            rng.randrange(n or 1),
            n - 1,
        ]
    )
    return data[: max(0, cut)], f"truncate@{cut}"


def splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Insert, delete or duplicate a chunk: shifts every later offset."""
    n = len(data)
    i = rng.randrange(min(n, 65536) or 1)
    k = rng.choice([1, 4, 8, 64, 4096])
    op = rng.choice(["ins", "del", "dup"])
    if op == "ins":
        return data[:i] + bytes(rng.randrange(256) for _ in range(k)) + data[
            i:
        ], f"insert{k}@{i}"
    if op == "del":
        return data[:i] + data[i + k :], f"delete{k}@{i}"
    return data[:i] + data[i : i + k] + data[i:], f"dup{k}@{i}"


# --------------------------------------------------------------------------- GGUF


@dataclass
class Site:
    """A field of a GGUF header: where it is, how wide, what it means."""

    offset: int
    width: int
    # version n_tensors n_kv strlen strbytes vtype atype acount scalar ndims dim
    # ttype toffset: see gguf_sites
    kind: str
    fmt: str = ""  # struct format of a scalar value ("<I", "<f", ...)


_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def gguf_sites(data: bytes) -> list[Site]:
    """Walk a well-formed GGUF (the seed) and list every mutable header field."""
    sites = [Site(4, 4, "version"), Site(8, 8, "n_tensors"), Site(16, 8, "n_kv")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind_len: str = "strlen") -> None:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        sites.append(Site(pos, 8, kind_len))
        if n:
            sites.append(Site(pos + 8, n, "strbytes"))
        pos += 8 + n

    def value(t: int) -> None:
        nonlocal pos
        if t == 8:
            string()
        elif t == 9:
            (at,) = struct.unpack_from("<I", data, pos)
            sites.append(Site(pos, 4, "atype"))
            sites.append(Site(pos + 4, 8, "acount"))
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            if at in _SCALAR:  # skip numeric arrays in one step
                pos += count * struct.calcsize(_SCALAR[at])
            else:
                for _ in range(count):
                    value(at)
        else:
            sites.append(Site(pos, struct.calcsize(_SCALAR[t]), "scalar", _SCALAR[t]))
            pos += struct.calcsize(_SCALAR[t])

    for _ in range(n_kv):
        string()
        (t,) = struct.unpack_from("<I", data, pos)
        sites.append(Site(pos, 4, "vtype"))
        pos += 4
        value(t)
    for _ in range(n_tensors):
        string()
        (nd,) = struct.unpack_from("<I", data, pos)
        sites.append(Site(pos, 4, "ndims"))
        pos += 4
        for _ in range(nd):
            sites.append(Site(pos, 8, "dim"))
            pos += 8
        sites.append(Site(pos, 4, "ttype"))
        sites.append(Site(pos + 4, 8, "toffset"))
        pos += 12
    return sites


def mutate_gguf(
    data: bytes, sites: list[Site], rng: random.Random
) -> tuple[bytes, str]:
    """Pick a field *kind* first (so the 1,024 token strings do not drown the
    three header counts), then a field of that kind, then a hostile value."""
    sites = [s for s in sites if s.offset + s.width <= len(data)]  # after a truncation
    if not sites:
        return flip_bytes(data, rng)
    kinds = sorted({s.kind for s in sites})
    kind = rng.choice(kinds)
    site = rng.choice([s for s in sites if s.kind == kind])
    buf = bytearray(data)
    o, w = site.offset, site.width
    if kind == "strbytes":
        if w == 0:
            return bytes(buf), "strbytes(empty)"
        i = o + rng.randrange(w)
        buf[i] = rng.choice([0x00, 0xFF, 0xC3, 0x80, buf[i] ^ 1])
        return bytes(buf), f"strbyte@{i}={buf[i]:#x}"
    if kind == "scalar" and site.fmt in ("<f", "<d"):
        v = rng.choice(
            [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, 1e-40]
        )
        struct.pack_into(site.fmt, buf, o, v)
        return bytes(buf), f"{kind}@{o}={v}"
    if kind in ("vtype", "atype", "ttype"):
        new = rng.choice(
            [0, 1, 4, 6, 7, 8, 9, 10, 12, 13, 14, 20, 39, 40, 255, 2**31, 2**32 - 1]
        )
    else:
        old = int.from_bytes(buf[o : o + w], "little")
        new = edge_value(rng, old, w)
    if new == int.from_bytes(buf[o : o + w], "little"):
        new ^= 1  # an unchanged field would waste the case
    buf[o : o + w] = new.to_bytes(w, "little")
    return bytes(buf), f"{kind}@{o}={new}"


# --------------------------------------------------------------------------- JSON


class Raw:
    """A JSON fragment written verbatim: ``Infinity``, ``1e400``, 10,000 brackets."""

    def __init__(self, text: str):
        self.text = text


# fmt: off
HOSTILE: list[Any] = [
    Raw("Infinity"), Raw("-Infinity"), Raw("NaN"), None, 1.5, True, False, -1, 0, 1,
    Raw("1" + "0" * 400), Raw("1e400"), Raw("-1e400"), 2**31, 2**63, 2**64, -(2**63),
    10**30, "", "x", "\u0000", "é", "\udcff", [], {}, [1, 2], [[]], {"a": 1}, [None],
    Raw("[" * 100 + "]" * 100), Raw("[" * 100_000 + "]" * 100_000), "A" * 100_000,
]
# fmt: on

# fmt: off
FILENAMES = [
    "/etc/passwd", "../backbone.gguf", "../../../../etc/passwd", "", ".", "..",
    "manifest.json", "backbone.gguf", "experts-00001.gguf", "a/../backbone.gguf",
    "sub/x.gguf", "x\u0000y", "x" * 5000, "/dev/zero", "/proc/self/mem", "~/.bashrc",
    "backbone.gguf/", "./backbone.gguf", "tokenizer.json", "C:\\x.gguf",
]
# fmt: on


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _nodes(v, path + (i,))
    return out


def _walk(obj: Any, rng: random.Random) -> tuple:
    """A random path that stops early with probability 1/3 per level: top-level
    keys (the structure) get hit far more than the 30,000 calibration ids."""
    path: tuple = ()
    while isinstance(obj, (dict, list)) and obj and (not path or rng.random() > 1 / 3):
        key = rng.choice(list(obj.keys()) if isinstance(obj, dict) else range(len(obj)))
        path += (key,)
        obj = obj[key]
    return path


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def dumps(obj: Any) -> str:
    """``json.dumps`` that writes ``Raw`` fragments verbatim."""
    raws: list[str] = []

    def enc(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\u0001RAW{len(raws) - 1}\u0001"
        if isinstance(o, dict):
            return {k: enc(v) for k, v in o.items()}
        if isinstance(o, list):
            return [enc(v) for v in o]
        return o

    text = json.dumps(enc(obj), indent=1)
    for i, r in enumerate(raws):
        text = text.replace(f'"\\u0001RAW{i}\\u0001"', r)
    return text


def mutate_json_obj(
    obj: Any, rng: random.Random, names: bool = False
) -> tuple[Any, str]:
    """One structural change to a parsed JSON document (mutated in place).
    ``names``: also try path-traversal file names on string nodes."""
    path = _walk(obj, rng) if rng.random() < 0.7 else rng.choice(_nodes(obj))
    if not path:
        return rng.choice([[], None, 1, "x", [obj], {"x": obj}]), "root"
    parent, key = _get(obj, path[:-1]), path[-1]
    old = parent[key]
    op = rng.choice(
        ["replace"] * 4 + ["delete", "rename", "string", "grow", "shrink", "wrap"]
    )
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[
            key + rng.choice(["_", "X", ""]) if rng.random() < 0.8 else key.upper()
        ] = parent.pop(key)
    elif op == "string" and isinstance(old, str):
        pool = (
            FILENAMES
            if names
            else [
                "",
                old * 1000,
                old[::-1],
                old + "\u0000",
                "\u202e" + old,
                old.upper(),
            ]
        )
        parent[key] = rng.choice(pool)
    elif op == "grow" and isinstance(old, list):
        parent[key] = old + old[-1:] * rng.choice([1, 2, 1000])
    elif op == "shrink" and isinstance(old, list):
        parent[key] = old[: rng.randrange(len(old))] if old else old
    elif op == "wrap":
        parent[key] = rng.choice([[old], {"value": old}, [old, old]])
    elif names and isinstance(old, str) and rng.random() < 0.5:
        parent[key] = rng.choice(FILENAMES)
    else:
        op = "replace"
        if (
            isinstance(old, (int, float))
            and not isinstance(old, bool)
            and rng.random() < 0.4
        ):
            parent[key] = rng.choice(
                [old + 1, old - 1, old * 2, -old, old * 1000, old / 3]
            )
        else:
            # A copy: a later change inside it must not alter the shared pool
            # (a stacked "wrap" once grew one pool entry a few thousand deep).
            parent[key] = copy.deepcopy(rng.choice(HOSTILE))
    new = parent.get(key, "<deleted>") if isinstance(parent, dict) else parent[key]
    show = new.text[:40] if isinstance(new, Raw) else repr(new)[:40]
    return obj, f"json.{op} {'/'.join(map(str, path))[:80]} -> {show}"


def mutate_json_text(
    text: str, rng: random.Random, names: bool = False
) -> tuple[bytes, str]:
    """Usually a structural change; sometimes raw damage to the text itself
    (truncation, invalid UTF-8, a byte flip), which only the parser sees."""
    r = rng.random()
    if r < 0.75:
        obj, what = mutate_json_obj(json.loads(text), rng, names)
        if rng.random() < 0.25:  # stack a second change now and then
            obj, what2 = (
                mutate_json_obj(obj, rng, names)
                if isinstance(obj, (dict, list))
                else (obj, "")
            )
            what += "; " + what2
        return dumps(obj).encode("utf-8", "surrogatepass"), what
    data = text.encode()
    if r < 0.85:
        return truncate(data, rng)
    if r < 0.92:
        i = rng.randrange(len(data) or 1)
        return data[:i] + rng.choice(
            [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]
        ) + data[i:], f"badutf8@{i}"
    return flip_bytes(data, rng)
