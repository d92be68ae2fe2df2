"""ONNX lowerings of the token ops, for ``torch.onnx.export(..., custom_translation_table=...)``.

Only standard ONNX ops (opset 18) are used, so ONNX Runtime and a plugin-free TensorRT
build can run them. Merges add the moved tokens into their destinations with
``ScatterElements(reduction="add")`` (opset 16+; TensorRT parses it natively), O(k·C) per
merge of k tokens: several tokens may land on one destination. (A one-hot assignment matrix
times the tokens, the earlier lowering, costs O(N·k·C): at a thousand tokens it rivalled
attention.)
The token count is static in the exported graph (only the batch is dynamic) for every recipe
but ToMe's alternate split, whose merge works out r from the tokens it gets
(``Recipe.any_length``): its lowering reads the count from the graph when it is symbolic.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from graphprune.errors import ExportError
from graphprune.ops.evit import evit_keep_count
from graphprune.ops.pitome import pitome_r
from graphprune.ops.tome import tome_effective_r


def _ints(*v):
    return op.Constant(value_ints=list(v))


def _static(value, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ExportError(f"{what}: the token dimension must be static for ONNX export (got {dim})")
    return dim


def _slice(t, start: int, end: int, axis: int = 1, step: int = 1):
    return op.Slice(t, _ints(start), _ints(end), _ints(axis), _ints(step))


def _take(t, idx, width: int):
    """Batched gather along axis 1: t (B, N, C), idx (B, k) -> (B, k, C), whole rows of a (B·N, C) view (one index per
    token, not one per element as GatherElements over an index expanded across the channels)."""
    if width == 1:
        return op.Unsqueeze(op.GatherElements(op.Squeeze(t, _ints(-1)), idx, axis=1), _ints(-1))
    n = op.Shape(t, start=1, end=2)
    batch = op.Squeeze(op.Shape(t, start=0, end=1), _ints(0))
    first = op.Mul(op.Unsqueeze(op.Range(op.Constant(value_int=0), batch, op.Constant(value_int=1)), _ints(1)), n)
    return op.Gather(op.Reshape(t, _ints(-1, width)), op.Add(idx, first), axis=0)  # (B, k, C)


def _scatter_add(base, idx, updates, width: int):
    """``base`` (B, n, C) with the rows of ``updates`` (B, k, C) added at rows ``idx`` (B, k) (several may land on one
    row)."""
    index = op.Expand(op.Unsqueeze(idx, _ints(-1)), _ints(1, 1, width))
    return op.ScatterElements(base, index, updates, axis=1, reduction="add")


def _one_hot(idx, n: int, like):
    """(B, k) int64 -> (B, k, n) one-hot in the dtype of ``like``."""
    hits = op.Equal(op.Unsqueeze(idx, _ints(-1)), _arange(n))
    return op.CastLike(hits, like)


def _interleave_prefix(unm, dst, protected: int):
    pa, pb = (protected + 1) // 2, protected // 2
    parts = []
    for i in range(pa):
        parts.append(_slice(unm, i, i + 1))
        if i < pb:
            parts.append(_slice(dst, i, i + 1))
    parts += [_slice(unm, pa, 2**62), _slice(dst, pb, 2**62)]
    return op.Concat(*parts, axis=1)


def _arange(n):
    """0..n-1 for a count ``n``: an int, or a one-element int64 tensor (a symbolic token count)."""
    end = op.Constant(value_int=n) if isinstance(n, int) else op.Squeeze(n, _ints(0))
    return op.Range(op.Constant(value_int=0), end, op.Constant(value_int=1))


def _positions(like, n=None):
    """(B, n) int64 rows of 0..n-1, with the batch size of ``like``; ``n``: an int, a one-element tensor, or None for
    the length of ``like``'s second axis."""
    if n is None:
        n = op.Shape(like, start=1, end=2)
    count = _ints(n) if isinstance(n, int) else n
    return op.Expand(op.Unsqueeze(_arange(n), _ints(0)), op.Concat(op.Shape(like, start=0, end=1), count, axis=0))


def _identity_maps(x, n=None):
    idx = _positions(x, n)
    return op.Identity(idx), op.Identity(idx)


def _untied(t, axis: int):
    """``t`` in float32 with the equal values that padding gives (+inf for a padding pair, float32's least value for
    a pair that may not merge) as distinct finite ones of the same rank, falling with the index along ``axis``
    (±1e30 − i·1e24): eager's max and stable sort take the first of equal values, and so do ONNX Runtime's ArgMax and
    TopK, but not every runtime (OpenVINO orders such ties its own way), so the order is written into the values.
    (-inf, the protected tokens, stays: they come last and never merge.)"""
    t = op.Cast(t, to=ir.DataType.FLOAT)  # (exact from float16 and bfloat16)
    step = op.Mul(op.Cast(_arange(op.Shape(t, start=axis, end=axis + 1)), to=ir.DataType.FLOAT),
                  op.Constant(value_float=1e24))
    big = op.Constant(value_float=1e30)
    barred = op.And(op.Less(t, op.Constant(value_float=-1e38)), op.Not(op.IsInf(t)))
    return op.Where(op.IsInf(t, detect_negative=0), op.Sub(big, step), op.Where(barred, op.Sub(op.Neg(big), step), t))


def _tome_counts(x, r: int, protected: int):
    """ToMe's (n, r, |A|) as one-element int64 tensors, worked out in the graph when the token count is symbolic
    (``tome_effective_r``: at most half of the unprotected tokens), else constants. None when nothing merges."""
    n = x.shape[1] if x.shape is not None else None
    if isinstance(n, int):
        r = tome_effective_r(n, r, protected)
        return None if r == 0 else (_ints(n), _ints(r), _ints((n + 1) // 2))
    if r <= 0:
        return None
    n = op.Shape(x, start=1, end=2)
    half = op.Div(op.Sub(n, _ints(protected)), _ints(2))
    applied = op.Max(op.Min(_ints(r), half), _ints(0))
    return n, applied, op.Div(op.Add(n, _ints(1)), _ints(2))


def tome_merge(x, size, metric, r: int, protected: int, valid=None, penalty=None):
    counts = _tome_counts(x, r, protected)
    if counts is None:
        return op.Identity(x), op.Identity(size), *_identity_maps(x)
    n, r, na = counts
    pa, pb = (protected + 1) // 2, protected // 2
    end = 2**62

    m = op.Div(metric, op.ReduceL2(metric, _ints(-1), keepdims=1))
    scores = op.MatMul(_slice(m, 0, end, step=2), op.Transpose(_slice(m, 1, end, step=2), perm=[0, 2, 1]))
    if penalty is not None:  # (Turbo: each A token's similarities drop by its penalty)
        scores = op.Sub(scores, op.CastLike(op.Unsqueeze(_slice(penalty, 0, end, step=2), _ints(2)), scores))
    if valid is not None:  # padding merges first, into padding only; real tokens never merge with padding
        va = op.Unsqueeze(_slice(valid, 0, end, step=2), _ints(2))
        vb = op.Unsqueeze(_slice(valid, 1, end, step=2), _ints(1))
        scores = op.Cast(scores, to=ir.DataType.FLOAT)  # (exact; a pair that may not merge: float32's least value)
        scores = op.Where(op.Equal(va, vb), scores, op.Constant(value_float=float(np.finfo(np.float32).min)))
        scores = op.Where(op.And(op.Not(va), op.Not(vb)), op.CastLike(op.Constant(value_float=np.inf), scores), scores)
    if protected:  # last, so nothing overrides it; Where, not Add: a protected token's score may be NaN (a zero key, e.g. a zero-initialised cls token)
        rows = op.Less(_arange(op.Shape(scores, start=1, end=2)), op.Constant(value_int=pa))
        cols = op.Less(_arange(op.Shape(scores, start=2, end=3)), op.Constant(value_int=pb))
        mask = op.Or(op.Unsqueeze(rows, _ints(1)), op.Unsqueeze(cols, _ints(0)))
        scores = op.Where(mask, op.CastLike(op.Constant(value_float=-np.inf), scores), scores)
    if valid is not None:  # (padding's equal values, in eager's order for every runtime)
        node_max = _untied(op.ReduceMax(scores, _ints(-1), keepdims=0), 1)
        node_idx = op.ArgMax(_untied(scores, 2), axis=-1, keepdims=0)
    else:
        node_max, node_idx = op.ReduceMax(scores, _ints(-1), keepdims=0), op.ArgMax(scores, axis=-1, keepdims=0)
    if protected:  # (OpenVINO's ReduceMax of a row of -inf gives the least finite value)
        node_max = op.Where(rows, op.CastLike(op.Constant(value_float=-np.inf), node_max), node_max)
    _, edge = op.TopK(node_max, na, axis=-1, largest=1, sorted=1)
    src_idx = op.Slice(edge, _ints(0), r, _ints(1))
    unm_idx = op.Slice(edge, r, _ints(end), _ints(1))
    if protected:  # unmerged A tokens back in positional order
        pos, _ = op.TopK(op.Cast(unm_idx, to=ir.DataType.FLOAT), op.Sub(na, r), axis=-1, largest=0, sorted=1)
        unm_idx = op.Cast(pos, to=ir.DataType.INT64)
    dst_idx = op.GatherElements(node_idx, src_idx, axis=1)

    def merge(t, width: int):
        src, dst = _slice(t, 0, end, step=2), _slice(t, 1, end, step=2)
        unm = _take(src, unm_idx, width)
        moved = _take(src, src_idx, width)
        return _interleave_prefix(unm, _scatter_add(dst, dst_idx, moved, width), protected)

    c = _static(x, 2, "tome_merge")
    new_size = merge(size, 1)
    # token maps: rep = positions of [unm A, B] in the input; assign inverts it, merged A follow their destination
    two, one = op.Constant(value_int=2), op.Constant(value_int=1)
    b_pos = op.Add(op.Mul(_positions(node_idx, op.Shape(scores, start=2, end=3)), two), one)
    rep = op.Squeeze(_interleave_prefix(op.Unsqueeze(op.Mul(unm_idx, two), _ints(-1)), op.Unsqueeze(b_pos, _ints(-1)), protected), _ints(-1))
    zeros = op.Mul(_positions(node_idx, n), op.Constant(value_int=0))
    where = op.ScatterElements(zeros, rep, _positions(rep), axis=1)
    where = op.ScatterElements(where, op.Mul(src_idx, two), op.GatherElements(where, op.Add(op.Mul(dst_idx, two), one), axis=1), axis=1)
    return op.Div(merge(op.Mul(x, size), c), new_size), new_size, where, rep


def evit_select(x, score, keep: float, protected: int):
    n, c = _static(x, 1, "evit_select"), _static(x, 2, "evit_select")
    k = evit_keep_count(n, keep, protected)
    if k >= n - protected:
        return op.Identity(x), *_identity_maps(x, n)
    rest, s = _slice(x, protected, n), _slice(score, protected, n)
    _, idx = op.TopK(s, _ints(k), axis=1, largest=1, sorted=1)
    kept = _take(rest, idx, c)
    chosen = op.ReduceSum(_one_hot(idx, n - protected, s), _ints(1), keepdims=0)
    one = op.CastLike(op.Constant(value_float=1.0), s)
    dropped = op.Sub(one, chosen)
    weight = op.Mul(s, dropped)
    fused = op.ReduceSum(op.Mul(rest, op.Unsqueeze(weight, _ints(-1))), _ints(1), keepdims=1)
    parts = ([_slice(x, 0, protected)] if protected else []) + [kept, fused]
    # token maps: kept tokens at their output slot, dropped ones at the fused token
    p = op.Constant(value_int=protected)
    best = op.ArgMax(op.Sub(weight, chosen), axis=1, keepdims=1)
    rep = op.Concat(*([_positions(idx, protected)] if protected else []), op.Add(idx, p), op.Add(best, p), axis=1)
    fill = op.Add(op.Mul(_positions(s, n - protected), op.Constant(value_int=0)), op.Constant(value_int=protected + k))
    tail = op.ScatterElements(fill, idx, op.Add(_positions(idx, k), p), axis=1)
    assign = op.Concat(*([_positions(idx, protected)] if protected else []), tail, axis=1)
    return op.Concat(*parts, axis=1), assign, rep


def _rank(score, n: int, protected: int):
    """Non-protected tokens best first (TopK keeps the lower index on ties), as input indices."""
    _, order = op.TopK(_slice(score, protected, n), _ints(n - protected), axis=1, largest=1, sorted=1)
    return op.Add(order, op.Constant(value_int=protected))


def _with_head(like, idx, protected: int):
    return op.Concat(_positions(like, protected), idx, axis=1) if protected else op.Identity(idx)


def prune(x, score, keep: int, protected: int):
    n, c = _static(x, 1, "prune"), _static(x, 2, "prune")
    if keep >= n - protected:
        return op.Identity(x), *_identity_maps(x, n)
    rep = _with_head(x, _slice(_rank(score, n, protected), 0, keep), protected)
    minus = op.Sub(op.Mul(_positions(x, n), op.Constant(value_int=0)), op.Constant(value_int=1))
    assign = op.ScatterElements(minus, rep, _positions(x, protected + keep), axis=1)
    return _take(x, rep, c), assign, rep


def merge_nearest(x, size, metric, score, keep: int, protected: int, valid=None, mode: str = "size"):
    n, c = _static(x, 1, "merge_nearest"), _static(x, 2, "merge_nearest")
    if keep >= n - protected:
        return op.Identity(x), op.Identity(size), *_identity_maps(x, n)
    order = _rank(score, n, protected)
    kept, rest = _slice(order, 0, keep), _slice(order, keep, n)
    rep = _with_head(x, kept, protected)
    d = _static(metric, 2, "merge_nearest")
    norm = op.Max(op.ReduceL2(metric, _ints(-1), keepdims=1), op.CastLike(op.Constant(value_float=1e-6), metric))
    m = op.Div(metric, norm)
    sim = op.MatMul(_take(m, rest, d), op.Transpose(_take(m, kept, d), perm=[0, 2, 1]))
    if valid is not None:
        vr, vk = op.GatherElements(valid, rest, axis=1), op.GatherElements(valid, kept, axis=1)
        both = op.And(op.Unsqueeze(vr, _ints(2)), op.Unsqueeze(vk, _ints(1)))
        sim = op.Where(both, sim, op.CastLike(op.Constant(value_float=-np.inf), sim))
    best = op.ReduceMax(sim, _ints(-1), keepdims=0)
    host = op.Add(op.ArgMax(sim, axis=-1, keepdims=0), op.Constant(value_int=protected))
    finite = op.Not(op.Or(op.IsInf(best), op.IsNaN(best)))  # padding (no host): dropped
    ok = op.Unsqueeze(op.CastLike(finite, x), _ints(-1))
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    best = op.Unsqueeze(op.Where(finite, best, zero), _ints(-1))
    kept_size = _take(size, rep, 1)  # (B, n_out, 1)

    def gather_in(base, guests, width: int):
        return _scatter_add(base, host, guests, width)

    def filled(value):  # (B, n_out, 1) of one value
        return op.Add(op.Mul(kept_size, op.CastLike(op.Constant(value_float=0.0), x)), value)

    guest_size = op.Mul(_take(size, rest, 1), ok)
    if mode == "size":
        xs = op.Mul(x, size)
        new_size = gather_in(kept_size, guest_size, 1)
        out = op.Div(gather_in(_take(xs, rep, c), op.Mul(ok, _take(xs, rest, c)), c), new_size)
    elif mode == "squeeze":
        e = op.CastLike(op.Constant(value_float=float(np.e)), x)
        w = op.Mul(op.Exp(best), ok)
        out = op.Div(gather_in(op.Mul(e, _take(x, rep, c)), op.Mul(w, _take(x, rest, c)), c), gather_in(filled(e), w, 1))
        new_size = gather_in(kept_size, guest_size, 1)
    else:  # mean
        one = op.CastLike(op.Constant(value_float=1.0), x)
        out = op.Div(gather_in(_take(x, rep, c), op.Mul(ok, _take(x, rest, c)), c), gather_in(filled(one), ok, 1))
        new_size = gather_in(kept_size, op.Mul(best, guest_size), 1)
    zeros = op.Mul(_positions(x, n), op.Constant(value_int=0))
    hosted = op.Where(finite, host, op.Constant(value_int=-1))
    assign = op.ScatterElements(op.ScatterElements(zeros, rep, _positions(x, protected + keep), axis=1), rest, hosted, axis=1)
    return out, new_size, assign, rep


def _sort_desc(t, n: int):
    """Indices sorting (B, n) ``t`` descending; ties keep the lower index (ONNX TopK)."""
    _, idx = op.TopK(t, _ints(n), axis=1, largest=1, sorted=1)
    return idx


def pitome_merge(x, size, metric, r: int, protected: int, margin: float, all_pairs: bool, valid=None):
    n, c = _static(x, 1, "pitome_merge"), _static(x, 2, "pitome_merge")
    r = pitome_r(n, r, protected, all_pairs)
    if r == 0:
        return op.Identity(x), op.Identity(size), *_identity_maps(x, n)
    t, d = n - protected, _static(metric, 2, "pitome_merge")
    m = _slice(metric, protected, n)
    m = op.Div(m, op.ReduceL2(m, _ints(-1), keepdims=1))
    e = op.Elu(op.Sub(op.MatMul(m, op.Transpose(m, perm=[0, 2, 1])), op.CastLike(op.Constant(value_float=margin), m)), alpha=1.0)
    inf = op.CastLike(op.Constant(value_float=np.inf), m)
    if valid is not None:
        v = _slice(valid, protected, n)
        vf = op.CastLike(v, m)
        count = op.Max(op.ReduceSum(vf, _ints(-1), keepdims=1), op.CastLike(op.Constant(value_float=1.0), m))
        e = op.Where(v, op.Div(op.ReduceSum(op.Mul(e, op.Unsqueeze(vf, _ints(1))), _ints(-1), keepdims=0), count), inf)
    else:
        e = op.ReduceMean(e, _ints(-1), keepdims=0)
    order = _sort_desc(e, t)
    pool = order if all_pairs else _slice(order, 0, 2 * r)
    width = t if all_pairs else 2 * r
    a, b = _slice(pool, 0, width, step=2), _slice(pool, 1, width, step=2)
    na, nb = (width + 1) // 2, width // 2
    scores = op.MatMul(_take(m, a, d), op.Transpose(_take(m, b, d), perm=[0, 2, 1]))
    if valid is not None:
        va = op.Unsqueeze(op.GatherElements(v, a, axis=1), _ints(2))
        vb = op.Unsqueeze(op.GatherElements(v, b, axis=1), _ints(1))
        scores = op.Where(op.Equal(va, vb), scores, op.Neg(inf))
        scores = op.Where(op.And(op.Not(va), op.Not(vb)), inf, scores)
    best = op.ReduceMax(scores, _ints(-1), keepdims=0)
    host = op.ArgMax(scores, axis=-1, keepdims=0)
    if all_pairs:
        edge = _sort_desc(best, na)
        unm, _ = op.TopK(op.Cast(_slice(edge, r, na), to=ir.DataType.FLOAT), _ints(na - r), axis=-1, largest=0, sorted=1)
        src, kept_a = _slice(edge, 0, r), op.GatherElements(a, op.Cast(unm, to=ir.DataType.INT64), axis=1)
    else:
        src, kept_a = _positions(x, na), _slice(order, 2 * r, t)
    p = op.Constant(value_int=protected)
    n_kept = (na - r) if all_pairs else (t - 2 * r)
    kept_a, merged, b = op.Add(kept_a, p), op.Add(op.GatherElements(a, src, axis=1), p), op.Add(b, p)
    slot = op.Add(op.GatherElements(host, src, axis=1), op.Constant(value_int=protected + n_kept))
    rep = _with_head(x, op.Concat(kept_a, b, axis=1), protected)
    n_out = protected + n_kept + nb
    xs = op.Mul(x, size)
    new_size = _scatter_add(_take(size, rep, 1), slot, _take(size, merged, 1), 1)
    out = op.Div(_scatter_add(_take(xs, rep, c), slot, _take(xs, merged, c), c), new_size)
    zeros = op.Mul(_positions(x, n), op.Constant(value_int=0))
    assign = op.ScatterElements(op.ScatterElements(zeros, rep, _positions(x, n_out), axis=1), merged, slot, axis=1)
    return out, new_size, assign, rep


def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``torch.sort(stable=True)`` (and argsort): ONNX TopK over the whole axis keeps equal values in index
    order, which is the stable order in both directions."""
    axis = dim % len(self.shape)
    values, idx = op.TopK(self, _ints(_static(self, axis, "sort")), axis=axis, largest=int(descending), sorted=1)
    return values, idx


TRANSLATIONS = {
    torch.ops.aten.sort.stable: sort_stable,
    torch.ops.graphprune.pitome_merge.default: pitome_merge,
    torch.ops.graphprune.prune.default: prune,
    torch.ops.graphprune.merge_nearest.default: merge_nearest,
    torch.ops.graphprune.tome_merge.default: tome_merge,
    torch.ops.graphprune.evit_select.default: evit_select,
}
