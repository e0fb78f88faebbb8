"""ONNX export of a converted model at one expert level, for onnxruntime users.

Every quantized matrix becomes com.microsoft ``MatMulNBits`` nodes carrying the
very blocks EdgeMoE runs: a plane's codes and sub-block scales go in as they
are (2-bit blocks of 16, 4-bit blocks of 32, Q6_K/Q8_0 codes as 8-bit with
their zero code), and a K-quant's per-sub-block minimum becomes a small second
matmul over per-block sums of the input. A level is the sum of its planes,
each scaled by its power-of-two shift. Backbone Q8_0 maps exactly too.

The graph takes ``input_ids`` [1, T] and returns ``logits`` [1, T, vocab] for
every position (no KV cache). Experts are evaluated densely, each weighted by
its routing weight (zero when not picked): exact, and meant for interop and
checking rather than speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.checkpoint.base import GGML_F32, Weight
from edgemoe.errors import ConfigError
from edgemoe.format.reader import EdgeCheckpoint
from edgemoe.format.spec import PROJS
from edgemoe.quant.kquants import Codec

_BITS = {"Q2_K": 2, "Q4_K": 4, "Q6_K": 8, "Q8_0": 8}  # MatMulNBits width per type


class _Graph:
    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, array: np.ndarray, stem: str = "c") -> str:
        from onnx import numpy_helper

        n = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def op(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., n] (n a multiple of 8/bits) packed low-first into bytes."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint16)
    out = np.zeros(c.shape[:-1], dtype=np.uint16)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out.astype(np.uint8)


def _plane_matmul(
    g: _Graph, x: str, raw: np.ndarray, type_name: str, k: int, shift: int
) -> str:
    """x [.., K] times one plane [N, K] (ggml blocks) as MatMulNBits."""
    codec = Codec.registry[type_name]
    codes, scale, offset = codec.components(raw.reshape(raw.shape[0], -1))
    n = codes.shape[0]
    bs, bits = codec.sub, _BITS[type_name]
    nb = k // bs
    zp = np.full((n, nb), codec.zero, dtype=np.uint8)
    y = g.op(
        "MatMulNBits",
        [
            x,
            g.const(_pack(codes.reshape(n, nb, bs), bits), "B"),
            g.const(scale.astype(np.float32), "scales"),
            g.const(_pack(zp, bits) if nb * bits % 8 == 0 else zp, "zp"),
        ],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=bs,
    )
    if offset is not None:
        # sum_k (s*q - m) x = MatMulNBits(x) - (x summed per block) @ m^T
        block_sum = np.kron(np.eye(nb, dtype=np.float32), np.ones((bs, 1), np.float32))
        xs = g.op("MatMul", [x, g.const(block_sum, "blocksum")])  # [.., nb]
        y = g.op("Sub", [y, g.op("MatMul", [xs, g.const(offset.T.astype(np.float32))])])
    if shift:
        y = g.op("Mul", [y, g.const(np.array(2.0**-shift, dtype=np.float32))])
    return y


def _linear(g: _Graph, x: str, w: Weight, bias: Weight | None = None) -> str:
    n, k = w.shape
    if w.qtype == 8 and k % 32 == 0:  # Q8_0: exact as 8-bit MatMulNBits
        y = _plane_matmul(g, x, w.data.reshape(n, -1), "Q8_0", k, 0)
    elif w.qtype in (10, 12, 14) and k % 256 == 0:
        name = {10: "Q2_K", 12: "Q4_K", 14: "Q6_K"}[w.qtype]
        y = _plane_matmul(g, x, w.data.reshape(n, -1), name, k, 0)
    else:
        wt = w.to_float32().T.astype(np.float32)  # [K, N]
        y = g.op("MatMul", [x, g.const(wt, "w")])
    if bias is not None:
        y = g.op("Add", [y, g.const(bias.to_float32())])
    return y


def _rms(g: _Graph, x: str, w: np.ndarray, eps: float) -> str:
    ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    inv = g.op(
        "Reciprocal",
        [g.op("Sqrt", [g.op("Add", [ms, g.const(np.array(eps, np.float32))])])],
    )
    return g.op("Mul", [g.op("Mul", [x, inv]), g.const(w.astype(np.float32))])


def _unpermute(w: Weight, heads: int) -> Weight:
    """llama.cpp's pairwise-RoPE row order back to rotate-halves (HF) order."""
    n, k = w.shape
    rows = w.data.reshape(n, -1)
    perm = np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)
    return Weight(w.name, w.qtype, w.shape, rows[perm].reshape(w.data.shape))


def export_onnx(
    model_dir: str | Path, level: int | None = None, out: str | Path | None = None
) -> Path:
    """Write ``model.onnx`` (or ``out``) for ``model_dir`` at ``level``."""
    import onnx
    from onnx import TensorProto, helper

    ckpt = EdgeCheckpoint(model_dir)
    try:
        m = ckpt.manifest
        level = m.levels[-1] if level is None else level
        n_planes = m.plan.n_planes(level)
        spec = ckpt.spec
        if spec.attention != "gqa" or spec.router != "softmax_topk":
            raise ConfigError(
                f"ONNX export does not cover {spec.attention}/{spec.router}"
            )
        beyond = [  # the math this exporter writes is Mixtral/Qwen/OLMoE's
            name
            for name, on in (
                ("attention sinks", spec.attn_sinks),
                ("per-layer windows", bool(spec.swa_layers)),
                ("YaRN RoPE", spec.rope_scaling is not None),
                ("expert biases", spec.moe_bias),
                ("clamped SwiGLU", spec.ffn_act != "swiglu"),
                ("expert groups", spec.n_group > 1),
                ("scaled routing", spec.routed_scale != 1.0),
                ("a padded hidden size", m.stored_dim != spec.n_embd),
            )
            if on
        ]
        if beyond:
            raise ConfigError(f"ONNX export does not cover {', '.join(beyond)}")
        g = _Graph()
        names = set(ckpt.names())

        def w(name: str) -> Weight | None:
            return ckpt.load(name) if name in names else None

        embed = ckpt.load("token_embd.weight").to_float32()
        x = g.op("Gather", [g.const(embed, "embed"), "input_ids"], axis=0)  # [1, T, D]
        t_len = g.op(
            "Gather", [g.op("Shape", ["input_ids"]), g.const(np.array(1))], axis=0
        )
        pos = g.op("Range", [g.const(np.array(0)), t_len, g.const(np.array(1))])  # [T]
        cos, sin = _rope_tables(spec, g, pos)
        mask = _causal_mask(spec, g, pos)
        hd, h, hkv = spec.head_dim, spec.n_head, spec.n_head_kv
        grp = h // hkv
        for layer in range(spec.n_layer):
            b = f"blk.{layer}."
            xn = _rms(g, x, w(b + "attn_norm.weight").to_float32(), spec.rms_eps)
            wq, wk = w(b + "attn_q.weight"), w(b + "attn_k.weight")
            bq, bk = w(b + "attn_q.bias"), w(b + "attn_k.bias")
            if spec.rope_interleaved:
                wq, wk = _unpermute(wq, h), _unpermute(wk, hkv)
                bq = _unpermute_vec(bq, h) if bq is not None else None
                bk = _unpermute_vec(bk, hkv) if bk is not None else None
            q = _linear(g, xn, wq, bq)
            k = _linear(g, xn, wk, bk)
            v = _linear(g, xn, w(b + "attn_v.weight"), w(b + "attn_v.bias"))
            if spec.qk_norm == "full":
                qn, kn = w(b + "attn_q_norm.weight"), w(b + "attn_k_norm.weight")
                if spec.rope_interleaved:
                    qn, kn = _unpermute_vec(qn, h), _unpermute_vec(kn, hkv)
                q = _rms(g, q, qn.to_float32(), spec.rms_eps)
                k = _rms(g, k, kn.to_float32(), spec.rms_eps)
            if spec.clip_qkv is not None:
                lo, hi = (
                    g.const(np.array(v_, np.float32))
                    for v_ in (-spec.clip_qkv, spec.clip_qkv)
                )
                q, k, v = (g.op("Clip", [t, lo, hi]) for t in (q, k, v))
            q = g.op("Reshape", [q, g.const(np.array([1, -1, h, hd]))])
            k = g.op("Reshape", [k, g.const(np.array([1, -1, hkv, hd]))])
            v = g.op("Reshape", [v, g.const(np.array([1, -1, hkv, hd]))])
            if spec.qk_norm == "head":
                q = _rms(g, q, w(b + "attn_q_norm.weight").to_float32(), spec.rms_eps)
                k = _rms(g, k, w(b + "attn_k_norm.weight").to_float32(), spec.rms_eps)
            q, k, v = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
            q, k = _rope(g, q, cos, sin, hd), _rope(g, k, cos, sin, hd)
            # Query heads grouped by their kv head: [1, Hkv, G*T, Dh].
            qg = g.op("Reshape", [q, g.const(np.array([1, hkv, -1, hd]))])
            scores = g.op("MatMul", [qg, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
            scores = g.op("Mul", [scores, g.const(np.array(hd**-0.5, np.float32))])
            scores = g.op(
                "Add", [scores, g.op("Tile", [mask, g.const(np.array([grp, 1]))])]
            )
            ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
            ctx = g.op("Reshape", [ctx, g.const(np.array([1, h, -1, hd]))])
            ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
            ctx = g.op("Reshape", [ctx, g.const(np.array([1, -1, h * hd]))])
            x = g.op(
                "Add",
                [
                    x,
                    _linear(
                        g, ctx, w(b + "attn_output.weight"), w(b + "attn_output.bias")
                    ),
                ],
            )
            hn = _rms(g, x, w(b + "ffn_norm.weight").to_float32(), spec.rms_eps)
            if spec.moe_layers[layer]:
                ffn = _moe(g, ckpt, layer, hn, w, n_planes)
            else:
                ffn = _mlp(
                    g,
                    hn,
                    w(b + "ffn_gate.weight"),
                    w(b + "ffn_up.weight"),
                    w(b + "ffn_down.weight"),
                )
            x = g.op("Add", [x, ffn])
        xn = _rms(g, x, w("output_norm.weight").to_float32(), spec.rms_eps)
        head = w("output.weight") or ckpt.load("token_embd.weight")
        g.nodes.append(helper.make_node("Identity", [_linear(g, xn, head)], ["logits"]))
        graph = helper.make_graph(
            g.nodes,
            "edgemoe",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])],
            [
                helper.make_tensor_value_info(
                    "logits", TensorProto.FLOAT, [1, "T", spec.n_vocab]
                )
            ],
            g.inits,
        )
        model = helper.make_model(
            graph,
            ir_version=10,
            opset_imports=[
                helper.make_opsetid("", 17),
                helper.make_opsetid("com.microsoft", 1),
            ],
        )
        model.doc_string = f"EdgeMoE {m.architecture}, experts at level {level}"
        path = Path(out) if out is not None else Path(model_dir) / "model.onnx"
        tmp = path.with_name(f".{path.name}.partial")
        try:
            onnx.save_model(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
            data_tmp = tmp.with_name(path.name + ".data")
            tmp.replace(path)
            if not data_tmp.exists():
                raise ConfigError("ONNX external data was not written")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    finally:
        ckpt.close()


def _unpermute_vec(w: Weight, heads: int) -> Weight:
    n = w.shape[0]
    perm = np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)
    return Weight(w.name, GGML_F32, w.shape, w.to_float32()[perm])


def _rope_tables(spec, g: _Graph, pos: str) -> tuple[str, str]:
    hd = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(spec.n_ctx_train, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=1).astype(np.float32)  # [ctx, Dh]
    sin = np.concatenate([np.sin(ang)] * 2, axis=1).astype(np.float32)
    return (
        g.op("Gather", [g.const(cos, "cos"), pos], axis=0),
        g.op("Gather", [g.const(sin, "sin"), pos], axis=0),
    )


def _rope(g: _Graph, x: str, cos: str, sin: str, hd: int) -> str:
    """Rotate halves (NeoX): x * cos + rotate_half(x) * sin; x [1, H, T, Dh]."""
    half = hd // 2
    a = g.op(
        "Slice",
        [x, g.const(np.array([0])), g.const(np.array([half])), g.const(np.array([-1]))],
    )
    b = g.op(
        "Slice",
        [
            x,
            g.const(np.array([half])),
            g.const(np.array([hd])),
            g.const(np.array([-1])),
        ],
    )
    rot = g.op("Concat", [g.op("Neg", [b]), a], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def _causal_mask(spec, g: _Graph, pos: str) -> str:
    """[T, T]: 0 where key j is visible to query i, -inf elsewhere."""
    qi = g.op("Unsqueeze", [pos, g.const(np.array([1]))])  # [T, 1]
    kj = g.op("Unsqueeze", [pos, g.const(np.array([0]))])  # [1, T]
    hidden = g.op("Greater", [kj, qi])
    if spec.sliding_window:
        far = g.op(
            "LessOrEqual",
            [kj, g.op("Sub", [qi, g.const(np.array(spec.sliding_window))])],
        )
        hidden = g.op("Or", [hidden, far])
    return g.op(
        "Where",
        [
            hidden,
            g.const(np.array(-np.inf, np.float32)),
            g.const(np.array(0.0, np.float32)),
        ],
    )


def _silu(g: _Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _mlp(g: _Graph, x: str, gate: Weight, up: Weight, down: Weight) -> str:
    act = g.op("Mul", [_silu(g, _linear(g, x, gate)), _linear(g, x, up)])
    return _linear(g, act, down)


def _moe(g: _Graph, ckpt: EdgeCheckpoint, layer: int, hn: str, w, n_planes: int):
    m = ckpt.manifest
    spec = ckpt.spec
    b = f"blk.{layer}."
    router = w(b + "ffn_gate_inp.weight").to_float32().T  # [D, E]
    probs = g.op("Softmax", [g.op("MatMul", [hn, g.const(router, "router")])], axis=-1)
    from onnx import helper

    k = g.const(np.array([spec.n_expert_used]))
    vals, idx = g.name("topk_v"), g.name("topk_i")  # TopK has two outputs
    g.nodes.append(helper.make_node("TopK", [probs, k], [vals, idx], axis=-1))
    if spec.norm_topk_prob:
        vals = g.op(
            "Div",
            [vals, g.op("ReduceSum", [vals, g.const(np.array([-1]))], keepdims=1)],
        )
    dense = g.op(
        "ScatterElements",
        [g.op("Mul", [probs, g.const(np.array(0.0, np.float32))]), idx, vals],
        axis=-1,
    )  # [1, T, E]
    shapes = ckpt.plane_shapes()
    top_planes = len(m.plan.planes)
    out = None
    for e in range(spec.n_expert):
        planes = top_planes if e in m.protected[layer] else n_planes
        parts = [ckpt.read_plane(layer, e, p) for p in range(planes)]

        def project(j: int, x: str) -> str:
            n, kk = shapes[PROJS[j]]
            acc = None
            for p in range(planes):
                bt = m.plan.planes[p]
                y = _plane_matmul(
                    g, x, parts[p][j].reshape(n, -1), bt.name, kk, m.shifts[layer][j][p]
                )
                acc = y if acc is None else g.op("Add", [acc, y])
            return acc

        act = g.op("Mul", [_silu(g, project(0, hn)), project(1, hn)])
        we = g.op("Gather", [dense, g.const(np.array([e]))], axis=2)  # [1, T, 1]
        y = g.op("Mul", [project(2, act), we])
        out = y if out is None else g.op("Add", [out, y])
    if b + "ffn_gate_shexp.weight" in set(ckpt.names()):
        shared = _mlp(
            g,
            hn,
            w(b + "ffn_gate_shexp.weight"),
            w(b + "ffn_up_shexp.weight"),
            w(b + "ffn_down_shexp.weight"),
        )
        gate = w(b + "ffn_gate_inp_shexp.weight")
        if gate is not None:
            sig = g.op(
                "Sigmoid",
                [g.op("MatMul", [hn, g.const(gate.to_float32().reshape(-1, 1))])],
            )
            shared = g.op("Mul", [shared, sig])
        out = g.op("Add", [out, shared])
    return out
