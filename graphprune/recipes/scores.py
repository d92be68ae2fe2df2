"""Token scores recipes rank by, built from an attention site's nodes without touching the model.

Each scorer returns ``(fn, nodes)``: ``fn(*nodes)`` computes a (B, N) score when emitted
into the graph. Scores come from q and k (the rows a method needs), so models that use fused
attention keep it.
"""

from __future__ import annotations


from graphprune.patterns import AttentionSite, ModelGraph


def has_class_token(graph: ModelGraph) -> bool:
    return graph.layout.roles[:1] in (["cls"], ["prefix"])


def _probs(site: AttentionSite, rows: slice | None):
    """A function (q, k[, mask]) -> softmax attention probabilities for the query ``rows`` (all when None)."""
    scale = site.scale()
    boolean = site.mask_is_bool

    def probs(q, k, mask=None):
        if rows is not None:
            q = q[:, :, rows]
        logits = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            m = mask[..., rows, :] if rows is not None else mask  # a size-1 query dim slices to itself
            logits = logits.masked_fill(~m, float("-inf")) if boolean else logits + m
        return logits.softmax(dim=-1)

    return probs, (site.q, site.k) + ((site.mask,) if site.mask is not None else ())


def attention_probs(site: AttentionSite):
    """The full (B, H, N, N) attention probabilities (explicit sites: the softmax node itself)."""
    if site.kind == "explicit":
        return (lambda p: p), (site.node,)
    return _probs(site, None)


def cls_attention(site: AttentionSite, has_cls: bool = True):
    """A function of the site's nodes giving each token's importance, (B, N).

    With a class token: the class token's attention to every token, from the class row only
    (softmax(q_cls · kᵀ · scale)), so this works with fused attention that never materialises
    the matrix. Without one (e.g. SigLIP): the attention each token receives, averaged over
    all queries and heads, which needs the full matrix at this block.
    """
    if site.kind == "explicit":
        if has_cls:
            return lambda probs: probs[:, :, 0, :].mean(dim=1), (site.node,)
        return lambda probs: probs.mean(dim=(1, 2)), (site.node,)
    probs, nodes = _probs(site, slice(0, 1) if has_cls else None)
    return (lambda *a: probs(*a).mean(dim=(1, 2))), nodes


def cls_attention_value_norm(site: AttentionSite, has_cls: bool = True):
    """ATS/PPT significance: class attention (summed over heads) × ‖v_j‖ (all heads), prefix excluded
    by the caller, normalised to sum to 1 over the tokens scored."""
    attn, nodes = cls_attention(site, has_cls)

    def score(v, *args):
        s = attn(*args) * v.transpose(1, 2).flatten(2).norm(dim=-1)
        return s

    return score, (site.v, *nodes)
