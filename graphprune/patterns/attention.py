"""Attention sites in an ATen graph: fused SDPA nodes and the explicit softmax(q·kᵀ)·v form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
ELEMENTWISE = (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor)
PASSTHROUGH = (aten.dropout.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.to.dtype)


@dataclass
class AttentionSite:
    node: Node  # the SDPA node, or the softmax node of the explicit form
    kind: str  # "sdpa" or "explicit"
    q: Node
    k: Node  # (B, H, N, d), as attention consumes it (after any q/k norm)
    v: Node

    @property
    def logits(self) -> Node | None:
        """Explicit form: the tensor softmax is applied to."""
        return self.node.args[0] if self.kind == "explicit" else None

    @property
    def mask(self):
        if self.kind != "sdpa":
            return None
        return self.node.args[3] if len(self.node.args) > 3 else self.node.kwargs.get("attn_mask")

    @property
    def mask_is_bool(self) -> bool:
        """A boolean mask (True = attend). Masks graphprune inserted itself carry no metadata and are additive."""
        val = self.mask.meta.get("val") if self.mask is not None else None
        return val is not None and val.dtype == torch.bool

    def scale(self) -> float:
        """SDPA's softmax scale (explicit scale, or 1/sqrt(head_dim))."""
        s = self.node.kwargs.get("scale")
        if s is None:
            s = self.q.meta["val"].shape[-1] ** -0.5
        return float(s)


def _is_tensor_node(a) -> bool:
    return isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _untransposed_key(kt: Node) -> Node | None:
    """``k`` from ``transpose(k, -2, -1)`` (or the equivalent permute)."""
    if kt.target == aten.transpose.int:
        dims = {d % kt.meta["val"].dim() for d in kt.args[1:3]}
        if dims == {kt.meta["val"].dim() - 2, kt.meta["val"].dim() - 1}:
            return kt.args[0]
    if kt.target == aten.permute.default:
        perm = list(kt.args[1])
        nd = len(perm)
        if perm[: nd - 2] == list(range(nd - 2)) and perm[nd - 2 :] == [nd - 1, nd - 2]:
            return kt.args[0]
    return None


def _explicit_site(sm: Node) -> AttentionSite | None:
    val = sm.meta.get("val")
    if val is None or sm.args[1] not in (-1, val.dim() - 1):
        return None
    # logits side: walk back through bias/scale to q @ k^T
    cur = sm.args[0]
    while isinstance(cur, Node) and cur.target in ELEMENTWISE:
        nxt = [a for a in cur.args if _is_tensor_node(a) and a.meta["val"].dim() == val.dim()]
        if len(nxt) != 1:
            nxt = [a for a in nxt if a.target in MATMUL or a.target in ELEMENTWISE]
        if not nxt:
            return None
        cur = nxt[0]
    if not isinstance(cur, Node) or cur.target not in MATMUL:
        return None
    q, kt = cur.args[0], cur.args[1]
    k = _untransposed_key(kt) if isinstance(kt, Node) else None
    if k is None:
        return None
    while q.target in (aten.mul.Tensor, aten.div.Tensor) and not _is_tensor_node(q.args[1]):
        q = q.args[0]
    # output side: (dropout) then probs @ v
    users = list(sm.users)
    while len(users) == 1 and users[0].target in PASSTHROUGH:
        users = list(users[0].users)
    av = [u for u in users if u.target in MATMUL]
    if not av:
        return None
    return AttentionSite(node=sm, kind="explicit", q=q, k=k, v=av[0].args[1])


def find_attention_sites(graph: Graph) -> list[AttentionSite]:
    sites = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == SDPA:
            sites.append(AttentionSite(node=n, kind="sdpa", q=n.args[0], k=n.args[1], v=n.args[2]))
        elif n.target in SOFTMAX:
            site = _explicit_site(n)
            if site is not None:
                sites.append(site)
    return sites
