"""Per-reader case generators over tiny seed models.

Seeds are built offline once per cache directory with EdgeMoE's own commands
(``synth --preset demo --layers 1``, ``convert``, ``export-gguf --type Q8_0``):
a 7 MiB HF model, its converted directory and a 4 MiB GGUF. A case is fully
determined by (reader, seed, index): ``random.Random(f"{seed}:{reader}:{i}")``,
so case 4711 is the same case however many jobs ran and in which order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import formats as F
import mutate as M

READERS = ("gguf", "safetensors", "tokenizer", "manifest", "template", "cli")
SEED_VERSION = "1"  # bump when the seed recipe changes
BUDGET = "64MiB"  # above the converted seed's floor (52.5 MiB at 2,048 tokens)


@dataclass
class Case:
    reader: str
    index: int
    what: str
    argv: list[str] | None = None  # an ``edgemoe`` command run inside the case dir
    call: str | None = None  # "template": render_chat on template.json
    files: dict[str, bytes] = field(default_factory=dict)  # written
    links: dict[str, str] = field(default_factory=dict)  # name -> seed file (hard link)
    symlinks: dict[str, str] = field(default_factory=dict)  # name -> target

    def materialize(self, where: Path) -> None:
        where.mkdir(parents=True)
        for name, data in self.files.items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            (where / name).write_bytes(data)
        for name, src in self.links.items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            try:  # a link costs nothing; the seeds are never written to
                os.link(src, where / name)
            except OSError:
                shutil.copyfile(src, where / name)
        for name, target in self.symlinks.items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, where / name)
        desc = {"reader": self.reader, "index": self.index, "what": self.what}
        desc.update(argv=self.argv, call=self.call)
        (where / "case.json").write_text(json.dumps(desc, indent=1))


# --------------------------------------------------------------------------- seeds


class Seeds:
    """The seed models and their parsed forms, loaded once per process."""

    def __init__(self, root: Path):
        self.root = root
        self.hf, self.edge, self.gguf = root / "hf", root / "edge", root / "model.gguf"
        self.gguf_bytes = self.gguf.read_bytes()
        self.gguf_sites = M.gguf_sites(self.gguf_bytes)
        self.st_bytes = (self.hf / "model.safetensors").read_bytes()
        self.text = {
            p: p.read_text()
            for p in (self.hf / "config.json", self.hf / "tokenizer.json")
            + (self.hf / "tokenizer_config.json", self.edge / "manifest.json")
        }
        self.template = json.loads(self.text[self.hf / "tokenizer_config.json"])[
            "chat_template"
        ]

    def hf_links(self, *skip: str) -> dict[str, str]:
        return {f"m/{p.name}": str(p) for p in self.hf.iterdir() if p.name not in skip}

    def edge_links(self, *skip: str) -> dict[str, str]:
        return {
            f"m/{p.name}": str(p) for p in self.edge.iterdir() if p.name not in skip
        }


def build_seeds(cache: Path, python: str = sys.executable) -> Seeds:
    """Build (or reuse) the seed models under ``cache``; a marker file records
    that every command finished, so an interrupted build is redone."""
    marker = cache / f"seeds-v{SEED_VERSION}.ok"
    if not marker.exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        cmds = [
            ["synth", "--preset", "demo", "--layers", "1", "-o", "hf"],
            ["convert", "hf", "-o", "edge", "--calib-tokens", "512"],
            ["export-gguf", "hf", "-o", "model.gguf", "--type", "Q8_0"],
        ]
        for cmd in cmds:  # cwd off the repo root: there `edgemoe` is the bare folder
            subprocess.run(
                [python, "-m", "edgemoe", *cmd],
                cwd=cache,
                check=True,
                capture_output=True,
            )
        marker.write_text("ok\n")
    return Seeds(cache)


def baseline_cases(seeds: Seeds) -> list[Case]:
    """The unmutated seeds through every command the fuzzer uses: each must
    succeed, or every mutated case would only test the same early error."""
    out = []
    for reader in READERS:
        c = _base(seeds, reader, random.Random(0), "baseline")
        out.append(c)
    return out


def _base(seeds: Seeds, reader: str, rng: random.Random, what: str) -> Case:
    if reader == "gguf":
        return Case(
            reader,
            -1,
            what,
            argv=["run", "model.gguf", "-p", "hi", "-n", "2"],
            links={"model.gguf": str(seeds.gguf)},
        )
    if reader == "manifest":
        return Case(
            reader,
            -1,
            what,
            argv=["run", "m", "-p", "hi", "-n", "2", "--budget", BUDGET],
            links=seeds.edge_links(),
        )
    argv = ["run", "m", "--chat", "-p", "hi", "-n", "2"]
    return Case(reader, -1, what, argv=argv, links=seeds.hf_links())


# --------------------------------------------------------------------------- readers


def _one_file(reader: str, argv, links, name: str, data: bytes, what: str) -> Case:
    """A model directory with file ``name`` replaced by ``data`` and every
    other seed file linked in (``links``: ``Seeds.hf_links`` or ``edge_links``)."""
    return Case(
        reader, 0, what, argv=argv, files={f"m/{name}": data}, links=links(name)
    )


def _gguf(seeds: Seeds, rng: random.Random) -> Case:
    data, whats = seeds.gguf_bytes, []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        r = rng.random()
        if r < 0.65:
            data, w = M.mutate_gguf(data, seeds.gguf_sites, rng)
        elif r < 0.8:
            data, w = M.flip_bytes(data, rng, 0, rng.choice([64, 4096, len(data)]))
        elif r < 0.9:
            data, w = M.truncate(data, rng)
        else:
            data, w = M.splice(data, rng)
        whats.append(w)
    argv = rng.choice(
        [["inspect", "model.gguf"], ["run", "model.gguf", "-p", "hi", "-n", "2"]]
    )
    return Case("gguf", 0, "; ".join(whats), argv=argv, files={"model.gguf": data})


def _safetensors(seeds: Seeds, rng: random.Random) -> Case:
    argv = rng.choice([["inspect", "m"], ["run", "m", "-p", "hi", "-n", "2"]])
    if rng.random() < 0.5:
        data, what = M.mutate_json_text(seeds.text[seeds.hf / "config.json"], rng)
        return _one_file(
            "safetensors",
            argv,
            seeds.hf_links,
            "config.json",
            data,
            "config.json " + what,
        )
    data, what = F.mutate_safetensors(seeds.st_bytes, rng)
    return _one_file(
        "safetensors", argv, seeds.hf_links, "model.safetensors", data, what
    )


def _tokenizer(seeds: Seeds, rng: random.Random) -> Case:
    argv = ["run", "m", "--chat", "-p", "hi", "-n", "2"]
    r = rng.random()
    if r < 0.55:
        name = "tokenizer.json"
        data, what = M.mutate_json_text(seeds.text[seeds.hf / name], rng)
    elif r < 0.95:
        name = "tokenizer_config.json"
        text = seeds.text[seeds.hf / name]
        if (
            rng.random() < 0.3
        ):  # the template is a string to JSON: mutate it as a template
            cfg = json.loads(text)
            cfg["chat_template"], what = F.mutate_template(cfg["chat_template"], rng)
            data = json.dumps(cfg).encode("utf-8", "surrogatepass")
        else:
            data, what = M.mutate_json_text(text, rng)
    else:
        name = rng.choice(["tokenizer.json", "tokenizer_config.json"])
        return Case(
            "tokenizer", 0, f"missing {name}", argv=argv, links=seeds.hf_links(name)
        )
    return _one_file("tokenizer", argv, seeds.hf_links, name, data, f"{name} {what}")


def _manifest(seeds: Seeds, rng: random.Random) -> Case:
    argv = rng.choice(
        [
            ["inspect", "m", "--verify"],
            ["run", "m", "-p", "hi", "-n", "2", "--budget", BUDGET],
        ]
    )
    r = rng.random()
    if r < 0.85:
        data, what = M.mutate_json_text(
            seeds.text[seeds.edge / "manifest.json"], rng, names=True
        )
        return _one_file(
            "manifest",
            argv,
            seeds.edge_links,
            "manifest.json",
            data,
            "manifest.json " + what,
        )
    name = rng.choice(["backbone.gguf", "experts-00001.gguf"])
    if r < 0.93:  # a shard damaged behind the manifest's back
        data = (seeds.edge / name).read_bytes()
        data, what = (
            M.flip_bytes(data, rng) if rng.random() < 0.6 else M.truncate(data, rng)
        )
        return _one_file(
            "manifest", argv, seeds.edge_links, name, data, f"{name} {what}"
        )
    target = rng.choice(
        [str(seeds.edge / name), "/etc/passwd", "/dev/zero", "../" + name, "missing"]
    )
    return Case(
        "manifest",
        0,
        f"{name} symlink -> {target}",
        argv=argv,
        symlinks={f"m/{name}": target},
        links=seeds.edge_links(name),
    )


_TEMPLATES = [
    None,  # the seed's
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "<<SYS>>{{ m['content'] }}<</SYS>>{% elif m['role'] == 'user' %}"
    "[INST] {{ m['content'] | trim }} [/INST]{% else %}{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
]
# fmt: off
_ODD_MESSAGES = [
    [{"role": "user", "content": None}], [{"role": "user", "content": ["x"]}],
    [{"role": "user"}], [], [{"role": "x" * 100000, "content": "é\u0000"}],
    [{"role": "user", "content": {"a": 1}}], ["x"],
]
# fmt: on


def _template(seeds: Seeds, rng: random.Random) -> Case:
    base = rng.choice(_TEMPLATES) or seeds.template
    tpl, what = F.mutate_template(base, rng)
    if rng.random() < 0.25:  # through the CLI: the template as shipped in a checkpoint
        cfg = json.loads(seeds.text[seeds.hf / "tokenizer_config.json"])
        cfg["chat_template"] = tpl
        data = json.dumps(cfg).encode("utf-8", "surrogatepass")
        return _one_file(
            "template",
            ["run", "m", "--chat", "-p", "hi", "-n", "2"],
            seeds.hf_links,
            "tokenizer_config.json",
            data,
            "cli " + what,
        )
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    if rng.random() < 0.2:
        messages = rng.choice(_ODD_MESSAGES)
        what += f"; messages={messages!r}"[:80]
    spec = {
        "template": tpl,
        "messages": messages,
        "vars": {"bos_token": "<s>", "eos_token": "</s>"},
    }
    data = json.dumps(spec).encode("utf-8", "surrogatepass")
    return Case("template", 0, what, call="template", files={"template.json": data})


# Option values that each probe a conversion, a bound or an allocation.
# fmt: off
_INTS = [
    "0", "-1", "1", "2", "3", "7", "64", "2147483648", "9223372036854775808",
    "1" + "0" * 30, "abc", "", " 1", "1_000", "\u0663", "+5", "-0", "0x10", "1e3",
]
# fmt: on
# fmt: off
_FLOATS = [
    "nan", "inf", "-inf", "-1", "0", "1e308", "1e-320", "abc", "1e400", "-0.0", "2",
    "1.5",
]
# fmt: on
# fmt: off
_BUDGETS = [
    "0", "-1", "1", "1B", "64MiB", "1e400GiB", "nan", "infGiB", "NaN MiB", "9" * 400,
    "1.5GiB", "64 MiB", "64mib", "0.0001KiB", "18446744073709551616", "64MiB64", "GiB",
    "", "53MiB", "52MiB", "1TiB", "-64MiB", "1e-9GiB", "64MiB ", "\u0666\u0664MiB",
]
# fmt: on
# fmt: off
_OPTS = {
    "--budget": _BUDGETS, "-s": _INTS, "-n": _INTS + ["100000"],
    "-c": _INTS + ["1000000000"], "-b": _INTS, "-t": _INTS + ["100000"],
    "--temp": _FLOATS, "--level": _INTS + ["4", "8", "16"], "--top-k": _INTS,
    "--top-p": _FLOATS, "--min-p": _FLOATS, "--repeat-penalty": _FLOATS,
    "--repeat-last-n": _INTS,
    "--quality": ["max", "x", "0,1", "nan,nan", "1,0", "-1,2", ",", "1,2,3"],
    "--stop": ["", "h", "\u0000", "\udcff"],
}
# fmt: on
# fmt: off
_PROMPTS = [
    b"", b"\xff\xfe", b"\x00" * 10, "é漢字🙂".encode(),  # noqa: E501 (wide chars) b"\xed\xa0\x80", b"hi\r\n" * 1000,
    b"x" * 100000, bytes(range(256)), b"<|endoftext|>" * 5, b"<|im_start|>",
]
# fmt: on


def _cli(seeds: Seeds, rng: random.Random) -> Case:
    model = rng.choice(["hf", "gguf", "edge"])
    links = {
        "gguf": {"model.gguf": str(seeds.gguf)},
        "hf": seeds.hf_links(),
        "edge": seeds.edge_links(),
    }[model]
    argv = [
        "run",
        "model.gguf" if model == "gguf" else "m",
        "-p",
        "hi",
        "-n",
        "2",
        "-s",
        "1",
    ]
    files, whats = {}, []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.2:  # the prompt from a file: arbitrary bytes, not only UTF-8
            prompt = rng.choice(_PROMPTS)
            files["prompt.txt"] = prompt
            argv[2:4] = ["-f", "prompt.txt"]
            whats.append(f"-f {prompt[:20]!r}")
        elif r < 0.27:
            argv.append("--chat")
            whats.append("--chat")
        else:
            opt = rng.choice(sorted(_OPTS))
            val = rng.choice(_OPTS[opt])
            argv += [opt, val]
            whats.append(f"{opt} {val[:30]!r}")
    return Case(
        "cli", 0, f"{model}: " + ", ".join(whats), argv=argv, files=files, links=links
    )


_GEN = {
    "gguf": _gguf,
    "safetensors": _safetensors,
    "tokenizer": _tokenizer,
    "manifest": _manifest,
    "template": _template,
    "cli": _cli,
}


def make_case(seeds: Seeds, reader: str, seed: int, index: int) -> Case:
    case = _GEN[reader](seeds, random.Random(f"{seed}:{reader}:{index}"))
    case.index = index
    return case
