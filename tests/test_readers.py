"""Checkpoint readers: safetensors (vs the safetensors package and torch), sharded
HF directories, config.json parsing and GGUF files written by our exporter."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import edgemoe
from edgemoe.arch import family_for_hf
from edgemoe.checkpoint import open_checkpoint
from edgemoe.checkpoint.base import GGML_F16, GGML_F32, tensor_layout
from edgemoe.checkpoint.gguf_file import GGUFCheckpoint
from edgemoe.checkpoint.hf import HFCheckpoint
from edgemoe.checkpoint.safetensors import (
    SafetensorsFile,
    bf16_to_f32,
    write_safetensors,
)
from edgemoe.errors import ConfigError, ModelFileError
from tests.conftest import TINY_CONFIGS

GGML_Q8_0 = 8
FAMILIES = sorted(TINY_CONFIGS)


def bits(a) -> np.ndarray:
    """The float32 bit patterns of a numpy array or torch tensor."""
    if not isinstance(a, np.ndarray):
        a = a.numpy()
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# -- safetensors: bf16 ---------------------------------------------------------


@pytest.fixture(scope="module")
def all_bf16(tmp_path_factory):
    """Every one of the 65536 bf16 bit patterns (NaNs, infinities, subnormals,
    -0.0), saved by the safetensors package from torch."""
    import torch
    from safetensors.torch import save_file

    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    t = t.view(torch.bfloat16).reshape(256, 256)
    path = tmp_path_factory.mktemp("bf16") / "all.safetensors"
    save_file({"x": t, "y": t[:3, :5].contiguous()}, str(path))
    return path, t


def test_bf16_widening_is_bit_exact_vs_torch(all_bf16):
    path, t = all_bf16
    f = SafetensorsFile(path)
    try:
        assert f.tensors["x"].dtype == "BF16" and f.tensors["x"].shape == (256, 256)
        got = f.float32("x")
        assert got.dtype == np.float32 and got.shape == (256, 256)
        np.testing.assert_array_equal(bits(got), bits(t.float()))
        np.testing.assert_array_equal(bits(f.float32("y")), bits(t[:3, :5].float()))
        raw = f.raw("x")
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(bits(bf16_to_f32(raw)), bits(t.float()))
    finally:
        f.close()


def test_bf16_widening_without_ggml_is_the_same(all_bf16, monkeypatch):
    """numpy's shift, where ggml's row converter is unavailable, gives the
    same bits, into a strided destination too."""
    from edgemoe import ggml_binding

    path, t = all_bf16
    f = SafetensorsFile(path)
    try:
        raw = f.raw("x")
        fast = bf16_to_f32(raw)
        monkeypatch.setitem(ggml_binding._ROW_TO_FLOAT, ggml_binding.BF16, None)
        np.testing.assert_array_equal(bits(bf16_to_f32(raw)), bits(fast))
        wide = np.zeros((256, 512), np.float32)
        bf16_to_f32(raw, wide[:, ::2])
        np.testing.assert_array_equal(bits(wide[:, ::2]), bits(t.float()))
    finally:
        f.close()


def test_hf_checkpoint_bf16_load_is_bit_exact_vs_torch(fixture_dir):
    """HFCheckpoint widens bf16 in place into its stacked [E, N, K] arrays."""
    import torch
    from safetensors import safe_open

    ckpt = HFCheckpoint(fixture_dir)
    hf = "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
    try:
        with safe_open(str(fixture_dir / "model.safetensors"), "pt") as ref:
            assert ref.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
            cases = {
                "token_embd.weight": ref.get_tensor("model.embed_tokens.weight"),
                "blk.1.attn_norm.weight": ref.get_tensor(
                    "model.layers.1.input_layernorm.weight"
                ),
                "blk.1.ffn_down_exps.weight": torch.stack(
                    [ref.get_tensor(hf.format(e)) for e in range(ckpt.spec.n_expert)]
                ),
            }
            for name, expected in cases.items():
                w = ckpt.load(name)
                assert w.qtype == GGML_F32 and w.shape == tuple(expected.shape)
                assert w.data.ctypes.data % 32 == 0
                np.testing.assert_array_equal(bits(w.data), bits(expected.float()))
    finally:
        ckpt.close()


# -- safetensors: other dtypes ---------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"],
)
def test_numpy_round_trip(tmp_path, dtype):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a = (rng.standard_normal((5, 7)) * 100).astype(dtype)
    if dtype == "float16":
        a[0, :4] = [np.inf, -np.inf, -0.0, 6e-8]  # subnormal
    save_file({"a": a, "scalar": np.array(3, dtype=dtype)}, str(tmp_path / "t.st"))
    f = SafetensorsFile(tmp_path / "t.st")
    try:
        np.testing.assert_array_equal(f.raw("a"), a)
        assert f.raw("a").dtype == a.dtype
        assert f.raw("scalar").shape == ()
        if a.dtype.kind == "f":
            got = f.float32("a")
            assert got.dtype == np.float32
            np.testing.assert_array_equal(bits(got), bits(a.astype(np.float32)))
        else:
            with pytest.raises(ModelFileError, match="not a float type"):
                f.float32("a")
    finally:
        f.close()


def test_write_safetensors_read_back_by_safe_open(tmp_path):
    import torch
    from safetensors import safe_open

    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    f16 = rng.standard_normal((8,)).astype(np.float16)
    i32 = rng.integers(-5, 5, (2, 2, 2)).astype(np.int32)
    bf16 = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.bfloat16)
    bf16_raw = bf16.view(torch.int16).numpy().view(np.uint16)
    path = tmp_path / "ours.safetensors"
    write_safetensors(
        path,
        [
            ("f32", "F32", f32.shape, f32.tobytes),
            ("f16", "F16", f16.shape, f16.tobytes),
            ("i32", "I32", i32.shape, i32.tobytes),
            ("bf16", "BF16", bf16_raw.shape, bf16_raw.tobytes),
            ("empty", "F32", (0, 3), lambda: b""),
        ],
        metadata={"format": "pt", "note": "edgemoe"},
    )
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    assert header_len % 8 == 0  # data starts 8-byte aligned
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt", "note": "edgemoe"}
        assert set(f.keys()) == {"f32", "f16", "i32", "bf16", "empty"}
        np.testing.assert_array_equal(f.get_tensor("f32"), f32)
        np.testing.assert_array_equal(f.get_tensor("f16"), f16)
        np.testing.assert_array_equal(f.get_tensor("i32"), i32)
        assert f.get_tensor("empty").shape == (0, 3)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("bf16"), bf16)
    ours = SafetensorsFile(path)
    try:
        assert ours.metadata == {"format": "pt", "note": "edgemoe"}
        np.testing.assert_array_equal(bits(ours.float32("bf16")), bits(bf16.float()))
    finally:
        ours.close()


def test_write_safetensors_failure_leaves_no_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    good = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="produced"):
        write_safetensors(
            path,
            [
                ("a", "F32", (4,), good.tobytes),
                ("b", "F32", (4,), lambda: b"\0" * 12),  # 3 floats for 4
            ],
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corrupt",
    ["empty", "short_header", "truncated_data", "bad_json", "bad_offsets"],
)
def test_corrupt_safetensors_raise_model_file_error(tmp_path, corrupt):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(16, dtype=np.float32)}, str(path))
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    if corrupt == "empty":
        data = b""
    elif corrupt == "short_header":
        data = data[: 8 + hlen // 2]
    elif corrupt == "truncated_data":
        data = data[:-4]
    elif corrupt == "bad_json":
        data = data[:8] + b"{" * hlen + data[8 + hlen :]
    else:
        header = json.loads(data[8 : 8 + hlen])
        header["a"]["data_offsets"] = [0, 60]
        blob = json.dumps(header).encode().ljust(hlen)
        data = data[:8] + blob + data[8 + hlen :]
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


# -- sharded HF checkpoints -----------------------------------------------------


@pytest.fixture(scope="module")
def sharded_mixtral(tiny_model, tmp_path_factory):
    """The tiny Mixtral saved again by transformers in ~20 KB shards."""
    import torch
    import transformers

    src = tiny_model("mixtral")
    out = tmp_path_factory.mktemp("sharded")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return src, out


def test_sharded_checkpoint_has_an_index(sharded_mixtral):
    _, out = sharded_mixtral
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    assert not (out / "model.safetensors").exists()
    # Some stacked expert tensor has its experts in more than one shard.
    w1 = {
        f
        for n, f in index["weight_map"].items()
        if n.startswith("model.layers.0.block_sparse_moe.experts.")
    }
    assert len(w1) > 1


def test_sharded_tensors_equal_unsharded(sharded_mixtral):
    src, out = sharded_mixtral
    a, b = HFCheckpoint(src), HFCheckpoint(out)
    try:
        assert sorted(a.names()) == sorted(b.names())
        assert a.spec == b.spec
        for name in a.names():
            np.testing.assert_array_equal(a.load(name).data, b.load(name).data)
    finally:
        a.close()
        b.close()


def test_sharded_logits_equal_unsharded(sharded_mixtral):
    src, out = sharded_mixtral
    ids = np.random.default_rng(3).integers(1, 384, size=12).tolist()
    with edgemoe.load(src) as m:
        expected = m.logits(ids)
    with edgemoe.load(out) as m:
        got = m.logits(ids)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_array_equal(got, expected)


def test_index_naming_a_tensor_its_shard_lacks(sharded_mixtral, tmp_path):
    _, out = sharded_mixtral
    for p in out.iterdir():
        (tmp_path / p.name).symlink_to(p)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    wrong = next(s for s in shards if s != wm["lm_head.weight"])
    wm["lm_head.weight"] = wrong
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="lm_head.weight"):
        open_checkpoint(tmp_path)


# -- config.json parsing ------------------------------------------------------------

ARCHS = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
DEFAULT_THETA = {
    "mixtral": 1e6,
    "qwen2_moe": 10000.0,
    "qwen3_moe": 10000.0,
    "olmoe": 10000.0,
    "gpt_oss": 150000.0,
}


def config_of(family: str, **changes) -> dict:
    """A config.json as transformers 5 writes it (``rope_parameters``), edited:
    a value of ``None`` in ``changes`` deletes the key."""
    import transformers

    kw = dict(TINY_CONFIGS[family])
    cls = getattr(transformers, kw.pop("cls"))
    # eos 0: OLMoE's default eos id (50279) lies outside a 384-token vocab.
    d = json.loads(cls(vocab_size=384, eos_token_id=0, **kw).to_json_string())
    d["architectures"] = [ARCHS[family]]
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def spec_of(family: str, config: dict):
    return family_for_hf(ARCHS[family]).spec_from_hf(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_theta_from_rope_parameters(family):
    cfg = config_of(family, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    cfg.pop("rope_theta", None)
    assert spec_of(family, cfg).rope_theta == 5e5


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_theta_top_level(family):
    # Hub configs (transformers 4) carry rope_theta at the top, rope_scaling null.
    cfg = config_of(family, rope_parameters=None, rope_theta=2.5e5)
    cfg["rope_scaling"] = None
    assert spec_of(family, cfg).rope_theta == 2.5e5
    # rope_parameters without a theta still reads the top-level one.
    cfg["rope_parameters"] = {"rope_type": "default"}
    assert spec_of(family, cfg).rope_theta == 2.5e5


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_theta_default(family):
    cfg = config_of(family, rope_parameters=None, rope_theta=None)
    assert spec_of(family, cfg).rope_theta == DEFAULT_THETA[family]


UNSUPPORTED_ROPE = {
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
    "linear_v4": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic_v4": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
}


@pytest.mark.parametrize(
    "family, rope",
    [
        (f, r)
        for f in FAMILIES
        for r in sorted(UNSUPPORTED_ROPE)
        if (f, r) != ("gpt_oss", "yarn")  # gpt-oss runs YaRN (test_gpt_oss.py)
    ],
)
def test_unsupported_rope_type_raises(family, rope):
    cfg = config_of(family, rope_parameters=None, rope_theta=1e4)
    cfg.update(UNSUPPORTED_ROPE[rope])
    with pytest.raises(ConfigError, match="rope_type"):
        spec_of(family, cfg)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_head_dim_null_and_explicit(family):
    cfg = config_of(family, head_dim=None)
    cfg["head_dim"] = None
    spec = spec_of(family, cfg)
    assert spec.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"] == 16
    cfg["head_dim"] = 32
    assert spec_of(family, cfg).head_dim == 32


def test_unsupported_rope_type_refused_on_load(fixture_dir, tmp_path):
    """Through the real reader, with the error naming the config file."""
    cfg = json.loads((fixture_dir / "config.json").read_text())
    assert cfg["head_dim"] is None  # the fixture exercises the null case
    spec = open_checkpoint(fixture_dir).spec
    assert spec.head_dim == 256 // 8 and spec.rope_theta == 1e6
    for p in fixture_dir.iterdir():
        if p.name != "config.json":
            (tmp_path / p.name).symlink_to(p)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="yarn"):
        edgemoe.load(tmp_path)


# -- GGUF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_files(tiny_model, tmp_path_factory):
    from edgemoe.converters.llama_gguf import write_gguf

    src = tiny_model("mixtral")
    out = tmp_path_factory.mktemp("gguf")
    ckpt = open_checkpoint(src)
    try:
        files = {
            q: write_gguf(ckpt, out / f"tiny-{q}.gguf", q)
            for q in ("F32", "F16", "Q8_0")
        }
    finally:
        ckpt.close()
    return src, files


def expected_type(name: str, shape: tuple[int, ...], qtype: str) -> int:
    # llama.cpp's policy: vectors and the router stay F32.
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return GGML_F32
    return {"F32": GGML_F32, "F16": GGML_F16, "Q8_0": GGML_Q8_0}[qtype]


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_tensor_shapes_and_types(gguf_files, qtype):
    src, files = gguf_files
    hf = HFCheckpoint(src)
    g = GGUFCheckpoint(files[qtype])
    try:
        layout = tensor_layout(g.spec)
        assert sorted(g.names()) == sorted(hf.names())
        for name in g.names():
            w = g.load(name)
            want = expected_type(name, layout[name][0], qtype)
            assert (w.shape, w.qtype) == (layout[name][0], want), name
            type_name, shape, nbytes = g.info(name)
            assert (shape, nbytes) == (w.shape, w.nbytes)
            assert type_name == {0: "F32", 1: "F16", 8: "Q8_0"}[want]
            assert w.data.ctypes.data % 32 == 0
        # The spec survives the round trip, except for the RoPE layout llama.cpp's
        # `llama` architecture uses (Q/K rows permuted on export).
        assert g.spec.rope_interleaved and not hf.spec.rope_interleaved
        # GGUF stores eps and theta as float32.
        assert g.spec.rms_eps == pytest.approx(hf.spec.rms_eps, rel=1e-6)
        assert g.spec.rope_theta == pytest.approx(hf.spec.rope_theta, rel=1e-6)
        same = dict(rope_interleaved=False, rms_eps=1.0, rope_theta=1.0)
        assert dataclasses.replace(g.spec, **same) == dataclasses.replace(
            hf.spec, **same
        )
    finally:
        g.close()
        hf.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_values_match_the_source(gguf_files, qtype):
    from edgemoe.converters.llama_gguf import permute_rows

    src, files = gguf_files
    hf = HFCheckpoint(src)
    g = GGUFCheckpoint(files[qtype])
    try:
        for name in (
            "token_embd.weight",
            "blk.0.attn_q.weight",
            "blk.1.ffn_up_exps.weight",
        ):
            ref = hf.load(name).data
            if ".attn_q." in name:
                ref = permute_rows(ref, g.spec.n_head)
            got = g.load(name).to_float32()
            if qtype == "F32":
                np.testing.assert_array_equal(got, ref)
            elif qtype == "F16":
                np.testing.assert_array_equal(got, ref.astype(np.float16))
            else:
                # Steps of absmax / 127 per 32-block: half a step off at most,
                # plus 127 times the f16 rounding of the step.
                blocks = ref.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                err = np.abs(got.reshape(-1, 32) - blocks)
                assert (err <= step * (0.5 + 127 * 2**-11)).all()
                assert err.max() > 0
    finally:
        g.close()
        hf.close()


@pytest.mark.parametrize(
    "qtype, name",
    [
        ("Q8_0", "token_embd.weight"),
        ("F16", "token_embd.weight"),
        ("F32", "token_embd.weight"),
        ("Q8_0", "blk.0.ffn_gate_inp.weight"),  # F32 router in a Q8_0 file
    ],
    ids=["q8_0_embd", "f16_embd", "f32_embd", "f32_router"],
)
def test_weight_rows_equal_full_dequantization(gguf_files, qtype, name):
    _, files = gguf_files
    g = GGUFCheckpoint(files[qtype])
    try:
        w = g.load(name)
        full = w.to_float32()
        n = w.shape[0]
        for ids in ([0], [n - 1, 0, 1, 1], list(range(n))[::-3]):
            ids = np.asarray(ids, dtype=np.int64)
            rows = w.rows(ids)
            assert rows.dtype == np.float32 and rows.shape == (len(ids), w.shape[1])
            np.testing.assert_array_equal(rows, full[ids])
    finally:
        g.close()
