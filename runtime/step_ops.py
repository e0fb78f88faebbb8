"""ggml ops a whole-step graph needs beyond matmuls: row gather and scatter
(embeddings, the KV cache), RoPE, masked softmax, top-k routing, permutes.

Each op checks in Python what the bundled ggml asserts (``ggml.c`` and
``ggml-cpu/ops.cpp`` of llama-cpp-python 0.3.36): an assertion there aborts
the process. Row ids that index memory come from ``Graph.ids`` and are
range-checked before every compute. ``Graph`` mixes these in.
"""

from __future__ import annotations

from edgemoe.errors import GGMLError
from edgemoe.ggml_binding import F16, F32, I32
from edgemoe.runtime.device import T

ROPE_NORMAL, ROPE_NEOX = 0, 2
NEG_BIG = -1e30
"""Added to the experts of groups a token may not choose (float32-safe)."""
"""ggml rope modes: rotate pairs (2i, 2i+1), or (i, i + n_dims/2)."""


class StepOps:
    """Ops for ``Graph``; they use its context, binding and id bookkeeping."""

    def _op(self, n_new: int, fn, *args, qtype: int, ne: tuple, **flags):
        """Call ggml op ``fn``, which creates ``n_new`` tensors: counted first,
        since a full ggml context asserts (aborts) where this raises."""
        self._ctx._count(n_new)
        ptr = fn(self._ctx.ctx, *args)
        if not ptr:
            raise GGMLError("ggml returned no tensor")
        return T(ptr, qtype, tuple(int(x) for x in ne), **flags)

    def _rows(self, op: str, rows, n: int) -> None:
        """``rows`` must be range-checked ids (``Graph.ids``) of at most ``n``."""
        bound = self._id_bound.get(rows.ptr)
        if bound is None or bound > n:
            raise GGMLError(
                f"{op}: row ids must come from Graph.ids() with a bound of at most "
                f"{n}, got {bound}"
            )

    def get_rows(self, a, rows):
        """Rows ``rows`` (I32 [M, ne2, ne3]) of ``a`` [K, N, ne2, ne3], as
        float32 [K, M, ne2, ne3] (quantized rows are dequantized)."""
        self._rows("get_rows", rows, a.ne[1])
        if a.ne[2] != rows.ne[1] or a.ne[3] != rows.ne[2] or rows.ne[3] != 1:
            raise GGMLError(f"get_rows: ids ne {rows.ne} do not fit data ne {a.ne}")
        return self._op(
            1, self.g.ggml_get_rows, a.ptr, rows.ptr,
            qtype=I32 if a.qtype == I32 else F32,
            ne=(a.ne[0], rows.ne[0], rows.ne[1], rows.ne[2]),
        )  # fmt: skip

    def set_rows(self, dst, src, rows):
        """Write ``src`` (F32 [K, M, ...]) into rows ``rows`` of ``dst`` (F32
        or F16 [K, N, ...]); returns ``dst`` as written. Add it to the graph
        with ``Graph.expand`` or read it afterwards: that orders the write."""
        self._rows("set_rows", rows, dst.ne[1])
        if dst.qtype not in (F32, F16) or src.qtype != F32:
            raise GGMLError("set_rows: float32 rows into a float32 or float16 tensor")
        if not (dst.contiguous and src.contiguous):
            raise GGMLError("set_rows: rows must be contiguous")
        if (
            dst.ne[0] != src.ne[0]
            or dst.ne[2:] != src.ne[2:]
            or src.ne[1] != rows.ne[0]
            or src.ne[2] % rows.ne[1]
            or src.ne[3] % rows.ne[2]
            or rows.ne[3] != 1
        ):
            raise GGMLError(
                f"set_rows: src ne {src.ne} and ids ne {rows.ne} do not fit dst "
                f"ne {dst.ne}"
            )
        return self._op(
            1, self.g.ggml_set_rows, dst.ptr, src.ptr, rows.ptr,
            qtype=dst.qtype, ne=dst.ne, view=True,
        )  # fmt: skip

    def rope(
        self,
        x,
        pos,
        n_dims: int,
        mode: int,
        freq_base: float,
        freq_scale: float = 1.0,
        n_ctx_orig: int = 0,
        ext_factor: float = 0.0,
        attn_factor: float = 1.0,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        freq_factors=None,
    ):
        """Rotary embedding of ``x`` (F32 [head_dim, heads, T]) at positions
        ``pos`` (I32 [T]), over the first ``n_dims`` of each head; pair i's
        frequency divided by ``freq_factors`` (F32 [n_dims / 2]) if given."""
        if mode not in (ROPE_NORMAL, ROPE_NEOX):
            raise GGMLError(f"rope: mode {mode} (normal 0 or neox 2)")
        if x.qtype != F32 or not x.contiguous or x.ne[3] != 1:
            raise GGMLError("rope: x must be contiguous 3-D float32")
        if pos.qtype != I32 or pos.ne[1:] != (1, 1, 1) or pos.ne[0] != x.ne[2]:
            raise GGMLError(f"rope: positions ne {pos.ne} for x ne {x.ne}")
        if not (0 < n_dims <= x.ne[0] and n_dims % 2 == 0):
            raise GGMLError(f"rope: n_dims {n_dims} for heads of {x.ne[0]}")
        if not freq_base > 0:
            raise GGMLError(f"rope: freq_base must be > 0, got {freq_base}")
        if freq_factors is not None and (
            freq_factors.qtype != F32 or freq_factors.ne != (n_dims // 2, 1, 1, 1)
        ):
            raise GGMLError(
                f"rope: freq_factors must be float32 [{n_dims // 2}], "
                f"got ne {freq_factors.ne}"
            )
        ff = freq_factors.ptr if freq_factors is not None else None
        return self._op(
            1, self.g.ggml_rope_ext, x.ptr, pos.ptr, ff, n_dims, mode,
            n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor, beta_fast,
            beta_slow, qtype=F32, ne=x.ne,
        )  # fmt: skip

    def soft_max(self, a):
        """softmax(a) along ne0 (routing's probabilities)."""
        if a.qtype != F32 or not a.contiguous:
            raise GGMLError("soft_max: input must be contiguous float32")
        return self._op(
            1, self.g.ggml_soft_max_ext, a.ptr, None, 1.0, 0.0, qtype=F32, ne=a.ne
        )

    def top_k(self, a, k: int):
        """Indices (I32 [k, ...]) of each row's ``k`` largest values, largest
        first: routing's top-k."""
        if a.qtype != F32 or not a.contiguous:
            raise GGMLError("top_k: input must be contiguous float32")
        if not 1 <= k <= a.ne[0]:
            raise GGMLError(f"top_k: k {k} for rows of {a.ne[0]}")
        # An argsort and a view of its first k columns: two tensors, rows
        # strided unless k covers the row.
        t = self._op(
            2, self.g.ggml_argsort_top_k, a.ptr, k, qtype=I32, ne=(k, *a.ne[1:]),
            contiguous=k == a.ne[0] or a.n == a.ne[0], view=True,
        )  # fmt: skip
        self._id_bound[t.ptr] = a.ne[0]  # in range by construction
        self._id_stride[t.ptr] = a.ne[0] * 4  # rows of the argsort
        return t

    def id_rows(self, ids, start: int, n: int):
        """Rows ``start .. start + n - 1`` of top_k's ids (I32 [K, T]): the
        experts of rank start.. of every token, a strided view."""
        stride = self._id_stride.get(ids.ptr)
        if stride is None or not (0 <= start and n > 0 and start + n <= ids.ne[0]):
            raise GGMLError(f"id_rows: rows {start}..{start + n} of ids ne {ids.ne}")
        t = self._op(
            1, self.g.ggml_view_2d, ids.ptr, n, ids.ne[1], stride, start * 4,
            qtype=I32, ne=(n, ids.ne[1], 1, 1), contiguous=ids.ne[1] == 1,
            view=True,
        )  # fmt: skip
        self._id_bound[t.ptr] = self._id_bound[ids.ptr]
        self._id_stride[t.ptr] = stride
        return t

    def acc_rows(self, a, b, start: int):
        """``a`` [n0, n1, n2] with ``b`` [n0, m1, n2] added to rows start ..
        start + m1 - 1 of each matrix (ggml_acc)."""
        if a.qtype != F32 or b.qtype != F32 or not (a.contiguous and b.contiguous):
            raise GGMLError("acc_rows: contiguous float32 operands only")
        if b.ne[0] != a.ne[0] or start + b.ne[1] > a.ne[1] or b.ne[2:] != a.ne[2:]:
            raise GGMLError(f"acc_rows: ne {b.ne} at row {start} of {a.ne}")
        nb1, nb2 = a.ne[0] * 4, a.ne[0] * a.ne[1] * 4
        return self._op(
            1, self.g.ggml_acc, a.ptr, b.ptr, nb1, nb2, nb2 * a.ne[2], start * nb1,
            qtype=F32, ne=a.ne,
        )  # fmt: skip

    def route(
        self, logits, k: int, kind: str, normalize: bool, select=None, scale=1.0,
        groups=None,
    ):  # fmt: skip
        """In-graph routing (``edgemoe.routing``): router ``logits`` (F32 [E,
        T]) -> expert ids (I32 [K, T], largest weight first) and their weights (F32
        [1, K, T]). ``kind`` "softmax_topk": the top k of the softmax over
        every expert; "sigmoid_topk": of the sigmoid, chosen by the sigmoid
        plus ``select`` (F32 [E], DeepSeek-V3's correction bias), weighed
        without it; either renormalised to sum 1 if ``normalize``;
        "topk_softmax": the softmax over the k largest logits. Weights are
        multiplied by ``scale``. ``groups`` (topk_group, eye, neg_big): choose
        only among the experts of each token's ``topk_group`` best groups
        (``eye`` F32 [G, G] and ``neg_big`` F32 [1] = NEG_BIG: the graph's
        constants)."""
        e, t = logits.ne[0], logits.ne[1]
        if logits.ne[2:] != (1, 1):
            raise GGMLError(f"route: logits must be [E, T], got ne {logits.ne}")
        if kind == "topk_softmax":
            ids = self.top_k(logits, k)  # [K, T]
            top = self.get_rows(self.reshape(logits, 1, e, t), ids)  # [1, K, T]
            w = self.reshape(self.soft_max(self.reshape(top, k, t)), 1, k, t)
            return ids, w
        if kind == "softmax_topk":
            probs = choice = self.soft_max(logits)  # [E, T]
        elif kind == "sigmoid_topk":
            probs = choice = self.sigmoid(logits)
            if select is not None:
                choice = self.add(probs, select)
        else:
            raise GGMLError(f"route: unknown routing {kind!r}")
        if groups is not None:
            choice = self._best_groups(choice, kind, *groups)
        ids = self.top_k(choice, k)  # [K, T]
        w = self.get_rows(self.reshape(probs, 1, e, t), ids)  # [1, K, T]
        if select is not None:
            # Chosen by score plus bias, ranked by weight (the presets' ranks).
            order = self.top_k(self.reshape(w, k, t), k)  # [K, T]
            picked = self.get_rows(self.reshape(self.cont(ids), 1, k, t), order)
            ids = self.reshape(picked, k, t)
            self._id_bound[ids.ptr] = e
            self._id_stride[ids.ptr] = k * 4  # contiguous rows of k ids
            w = self.get_rows(w, order)
        if normalize:
            total = self._op(  # [1, 1, T]
                1, self.g.ggml_sum_rows, self.reshape(w, k, t).ptr,
                qtype=F32, ne=(1, t, 1, 1),
            )  # fmt: skip
            w = self._op(
                1, self.g.ggml_div, w.ptr, self.reshape(total, 1, 1, t).ptr,
                qtype=F32, ne=w.ne,
            )  # fmt: skip
        if scale != 1.0:
            w = self.scale(w, scale)
        return ids, w

    def _best_groups(self, choice, kind: str, topk_group: int, eye, neg_big):
        """``choice`` [E, T] with NEG_BIG added outside each token's
        ``topk_group`` best groups (``eye`` [G, G]): a group scores its best
        expert (softmax, DeepSeek-V2) or its best two (sigmoid, V3)."""
        e, t, g = choice.ne[0], choice.ne[1], eye.ne[0]
        per = self.reshape(choice, e // g, g, t)  # [E/G, G, T]
        n = 1 if kind == "softmax_topk" else 2
        best = self.get_rows(self.reshape(per, 1, e // g, g, t), self.top_k(per, n))
        score = self._op(  # [1, G, T]: each group's best n summed
            1, self.g.ggml_sum_rows, self.reshape(best, n, g, t).ptr,
            qtype=F32, ne=(1, g, t, 1),
        )  # fmt: skip
        chosen = self.top_k(self.reshape(score, g, t), topk_group)  # [tg, T]
        flat = self.reshape(self.cont(chosen), topk_group * t, 1)
        self._id_bound[flat.ptr] = g  # top_k's ids, in range by construction
        onehot = self.reshape(self.get_rows(eye, flat), g, topk_group, t)
        picked = self._op(  # [1, G, T]: 1 in a chosen group, else 0
            1, self.g.ggml_sum_rows,
            self.cont(self.permute(onehot, 1, 0, 2, 3)).ptr,
            qtype=F32, ne=(1, g, t, 1),
        )  # fmt: skip
        # picked * -NEG_BIG + NEG_BIG: exactly 0 in a chosen group.
        penalty = self.add(self.scale(picked, -NEG_BIG), neg_big)
        return self.reshape(self.add(per, penalty), e, t)

    def lookup(self, table, ids, bound: int):
        """``table`` (I32 [n]) at ``ids`` (I32 [K, T], bound n) -> I32 [K, T]:
        expert ids mapped to slots. ``bound`` exceeds every value of the
        table (the caller built it), so the result indexes ``mul_mat_id``."""
        k, t = ids.ne[0], ids.ne[1]
        flat = self.reshape(self.cont(ids), k * t, 1)  # [K*T, 1]
        self._id_bound[flat.ptr] = self._id_bound.get(ids.ptr, 1 << 62)
        rows = self.get_rows(self.reshape(table, 1, table.ne[0]), flat)  # [1, K*T]
        out = self.reshape(rows, k, t)
        self._id_bound[out.ptr] = bound
        return out

    def clamp(self, a, lo: float, hi: float):
        if a.qtype != F32:
            raise GGMLError("clamp: float32 only")
        return self._op(1, self.g.ggml_clamp, a.ptr, lo, hi, qtype=F32, ne=a.ne)

    def pad(self, a, n0: int):
        """``a`` with ``n0`` zeros after each row (ne0 + n0): activations
        widened to experts stored padded to whole quant blocks."""
        if a.qtype != F32 or not a.contiguous or n0 < 0:
            raise GGMLError(f"pad: contiguous float32 and n0 >= 0, got {n0}")
        return self._op(
            1, self.g.ggml_pad, a.ptr, n0, 0, 0, 0, qtype=F32,
            ne=(a.ne[0] + n0, *a.ne[1:]),
        )  # fmt: skip

    def concat(self, a, b):
        """``a`` [n0, ...] and ``b`` [m0, ...] joined along ne0 (float32)."""
        if a.qtype != F32 or b.qtype != F32 or a.ne[1:] != b.ne[1:]:
            raise GGMLError(f"concat: float32 ne {a.ne} and {b.ne} must match past ne0")
        return self._op(
            1, self.g.ggml_concat, a.ptr, b.ptr, 0, qtype=F32,
            ne=(a.ne[0] + b.ne[0], *a.ne[1:]),
        )  # fmt: skip

    def attention_latent(self, q, cache, mask, n_kv: int, dv: int, scale: float):
        """MLA's attention: ``q`` (F32 [Dk, T, heads], each head's query in
        latent-plus-RoPE space) over the first ``n_kv`` cells of one cache
        row per token (ne (Dk, C)), shared by every head as keys, whose first
        ``dv`` floats are the values. -> [dv, heads, T]."""
        dk, t, heads = q.ne[0], q.ne[1], q.ne[2]
        if cache.ne[0] != dk or not 0 < dv <= dk or not 0 < n_kv <= cache.ne[1]:
            raise GGMLError(
                f"attention_latent: queries of {dk} over a cache of ne {cache.ne}, "
                f"{n_kv} cells, values of {dv}"
            )
        if mask is None or mask.qtype != F16 or mask.ne[:2] != (n_kv, t):
            raise GGMLError(f"attention_latent: the mask must be F16 [{n_kv}, {t}]")
        es = 4 if cache.qtype == F32 else 2
        k = self.view_3d(cache, dk, n_kv, 1, dk * es, dk * n_kv * es)  # [Dk, n_kv, 1]
        v = self.view_3d(cache, dv, n_kv, 1, dk * es, dk * n_kv * es)  # strided rows
        return self._op(
            1, self.g.ggml_flash_attn_ext, q.ptr, k.ptr, v.ptr, mask.ptr, scale,
            0.0, 0.0, qtype=F32, ne=(dv, heads, t, 1),
        )  # fmt: skip

    def permute(self, a, *axes: int):
        """``a`` with dimension i moved to ``axes[i]`` (ggml_permute): a view."""
        if sorted(axes) != [0, 1, 2, 3]:
            raise GGMLError(f"permute: axes {axes} are not a permutation of 0..3")
        ne = [0] * 4
        for i, ax in enumerate(axes):
            ne[ax] = a.ne[i]
        return self._op(
            1, self.g.ggml_permute, a.ptr, *axes, qtype=a.qtype, ne=ne,
            contiguous=False, view=True,
        )  # fmt: skip

    def cont(self, a):
        """A contiguous copy of ``a`` (after a permute)."""
        if a.qtype not in (F32, F16, I32):
            raise GGMLError("cont: float or int32 tensors only")
        return self._op(1, self.g.ggml_cont, a.ptr, qtype=a.qtype, ne=a.ne)

    def view_3d(self, a, ne0: int, ne1: int, ne2: int, nb1: int, nb2: int, offset=0):
        """A strided float32 or float16 view of ``a``'s bytes (a KV cache's
        rows seen as [head_dim, heads, positions]); bounds-checked against
        ``a``."""
        if a.qtype not in (F32, F16):
            raise GGMLError("view_3d: float32 or float16 only")
        es = 4 if a.qtype == F32 else 2
        end = offset + (ne2 - 1) * nb2 + (ne1 - 1) * nb1 + ne0 * es
        if min(ne0, ne1, ne2) <= 0 or offset < 0 or end > a.n * es:
            raise GGMLError(
                f"view_3d: bytes {offset}..{end} outside a tensor of {a.n * es}"
            )
        return self._op(
            1, self.g.ggml_view_3d, a.ptr, ne0, ne1, ne2, nb1, nb2, offset,
            qtype=a.qtype, ne=(ne0, ne1, ne2, 1),
            contiguous=nb1 == ne0 * es and nb2 == ne0 * ne1 * es, view=True,
        )  # fmt: skip

    def add_id(self, a, b, ids):
        """``a`` [N, K, T] + row ``ids[k, t]`` of ``b`` [N, E]: each expert's
        bias on its own rows (``ids`` from ``Graph.ids`` or ``top_k``)."""
        self._rows("add_id", ids, b.ne[1])
        if a.qtype != F32 or b.qtype != F32 or not b.contiguous:
            raise GGMLError("add_id: float32 operands, contiguous bias rows")
        if (
            a.ne[0] != b.ne[0]
            or a.ne[1:3] != ids.ne[:2]
            or a.ne[3] != 1
            or b.ne[2:] != (1, 1)
        ):
            raise GGMLError(f"add_id: a ne {a.ne}, b ne {b.ne}, ids ne {ids.ne}")
        return self._op(
            1, self.g.ggml_add_id, a.ptr, b.ptr, ids.ptr, qtype=F32, ne=a.ne
        )

    def attention(
        self, q, k_cache, v_cache, mask, n_kv: int, n_head_kv: int, scale, sinks=None
    ):
        """Causal GQA attention of ``q`` (F32 [head_dim, heads, T], RoPE
        applied) over the first ``n_kv`` cells of the caches (F32 or F16 ne
        (head_dim * kv_heads, C), a cell per row; pass the ``set_rows``
        results so the reads come after this step's writes), as one
        ``flash_attn_ext``: it skips the cells the mask hides, so a token of
        one sequence in a batch costs only its own sequence's cells. ``mask``
        F16 [n_kv, T] adds -inf where a token must not look; ``sinks`` (F32
        [heads]) one more logit per head in each softmax, with no value.
        -> [head_dim, heads, T]. Query head h reads kv head h // (heads /
        kv_heads)."""
        hd, heads, t = q.ne[0], q.ne[1], q.ne[2]
        c, dkv = k_cache.ne[1], k_cache.ne[0]
        if heads % n_head_kv or dkv != hd * n_head_kv or v_cache.ne != k_cache.ne:
            raise GGMLError(
                f"attention: {heads} query heads of {hd} over caches of ne "
                f"{k_cache.ne} and {v_cache.ne} for {n_head_kv} kv heads"
            )
        if k_cache.qtype != v_cache.qtype or not 0 < n_kv <= c:
            raise GGMLError(f"attention: {n_kv} positions of caches {k_cache.ne}")
        if (
            mask is None
            or mask.qtype != F16
            or not mask.contiguous
            or mask.ne[:2] != (n_kv, t)
        ):
            raise GGMLError(f"attention: the mask must be contiguous F16 [{n_kv}, {t}]")
        es = 4 if k_cache.qtype == F32 else 2
        kh, vh = (  # [hd, n_kv, kvh]
            self.view_3d(cache, hd, n_kv, n_head_kv, dkv * es, hd * es)
            for cache in (k_cache, v_cache)
        )
        if sinks is not None and (sinks.qtype != F32 or sinks.ne != (heads, 1, 1, 1)):
            raise GGMLError(f"attention: sinks must be float32 [{heads}]")
        qh = self.permute(q, 0, 2, 1, 3)  # [hd, T, heads]
        out = self._op(  # [hd, heads, T]
            1, self.g.ggml_flash_attn_ext, qh.ptr, kh.ptr, vh.ptr, mask.ptr,
            scale, 0.0, 0.0, qtype=F32, ne=(hd, heads, t, 1),
        )  # fmt: skip
        if sinks is not None:
            self.g.ggml_flash_attn_ext_add_sinks(out.ptr, sinks.ptr)
        return out
