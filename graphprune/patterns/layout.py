"""Token layout: protected prefix tokens (cls, distillation, registers) and the pooling head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from graphprune.patterns.attention import SDPA

aten = torch.ops.aten

TOKENWISE = {
    aten.layer_norm.default, aten.rms_norm.default, aten.dropout.default, aten.linear.default,
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.clone.default,
    aten.contiguous.default, aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.detach.default,
}
# ops that may lead the tokens into an attention pool (keys / values)
TO_HEADS = {aten.reshape.default, aten.view.default, aten.permute.default, aten.transpose.int, aten.unbind.int}
BIG = 2**62


@dataclass
class TokenLayout:
    prefix: int = 0  # leading tokens that must never be merged or dropped
    roles: list[str] = field(default_factory=list)  # one per prefix token: cls, dist, register, prefix
    pooling: str = "tokens"  # cls, mean, attention, tokens (the output is the token sequence)
    reads: list[int] = field(default_factory=list)  # token indices the head reads directly
    mean_pools: list[tuple[Node, int]] = field(default_factory=list)  # (mean node, first token)
    attention_pools: list[tuple[Node, int]] = field(default_factory=list)  # (SDPA node, first token)
    returns_tokens: bool = False
    opaque: str = ""  # why the head's use of the tokens could not be followed ("" when it could)

    @property
    def per_token(self) -> bool:
        """Whether the output depends on more than the protected prefix tokens (so reduced tokens show)."""
        return bool(self.returns_tokens or self.mean_pools or self.attention_pools or self.opaque)


def _depends_on_input(node: Node, memo: dict) -> bool:
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        memo[node] = True
        return True
    # only tensor edges count: a learned token expanded to the batch size is still learned
    res = any(_depends_on_input(a, memo) for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))
    memo[node] = res
    return res


def _role(name: str) -> str:
    name = name.lower()
    if "dist" in name:
        return "dist"
    if "reg" in name:
        return "register"
    if "cls" in name or "class" in name:
        return "cls"
    return "prefix"


def find_prefix(first_marker: Node) -> tuple[int, list[str]]:
    """Count learned tokens concatenated in front of the patch tokens before the first block."""
    cur, memo = first_marker.args[0], {}
    while cur.op == "call_function":
        if cur.target == aten.cat.default and cur.args[1] in (1, -2):
            roles: list[str] = []
            for part in cur.args[0]:
                if _depends_on_input(part, memo):
                    break
                attrs = [a.target for a in part.all_input_nodes if a.op == "get_attr"] or [part.name]
                roles += [_role(str(attrs[0]))] * int(part.meta["val"].shape[1])
            return len(roles), roles
        prev = [a for a in cur.all_input_nodes if _depends_on_input(a, memo)]
        if len(prev) != 1:
            break
        cur = prev[0]
    return 0, []


def analyze_head(out_marker: Node, layout: TokenLayout) -> None:
    """Walk from the last block's output to the graph output and record how tokens are used."""
    stack = [(out_marker, 0, False)]  # node, first token index, inside an attention-pool reshape
    seen = set()
    while stack:
        node, start, heads = stack.pop()
        for u in node.users:
            if (u, start) in seen:
                continue
            seen.add((u, start))
            t = u.target
            if u.op == "output":
                if heads:
                    layout.opaque = "the model returns reshaped tokens"
                layout.returns_tokens = True
            elif t == aten.sym_size.int:
                continue
            elif t == SDPA and heads and node in u.args[1:3]:
                if (u, start) not in [(p, s) for p, s in layout.attention_pools]:
                    layout.attention_pools.append((u, start))
            elif t in TO_HEADS or (t == aten.linear.default and heads) or (u.op == "call_function" and getattr(t, "__name__", "") == "getitem" and heads):
                stack.append((u, start, True))
            elif heads:
                layout.opaque = f"the head reshapes the tokens and uses them in '{u.name}' ({t})"
            elif t in TOKENWISE:
                stack.append((u, start, False))
            elif t == aten.select.int and u.args[1] in (1, -2):
                layout.reads.append(start + u.args[2])
            elif t == aten.slice.Tensor and u.args[1] in (1, -2):
                a = u.args[2] if len(u.args) > 2 and u.args[2] is not None else 0
                b = u.args[3] if len(u.args) > 3 and u.args[3] is not None else BIG
                if b >= BIG:
                    stack.append((u, start + a, False))
                else:
                    layout.reads += list(range(start + a, start + b))
            elif t == aten.mean.dim and list(u.args[1]) in ([1], [-2]):
                layout.mean_pools.append((u, start))
            else:
                layout.opaque = f"the output head consumes the tokens through '{u.name}' ({t})"
    reads = sorted(set(layout.reads))
    if reads and reads == list(range(len(reads))) and len(reads) > layout.prefix:
        # leading tokens the head reads by position (BERT's [CLS]) are kept in place like learned ones
        layout.roles += ["cls" if not layout.roles else "prefix"] * (len(reads) - layout.prefix)
        layout.prefix = len(reads)
    bad = [i for i in reads if i >= layout.prefix]
    if bad:
        layout.opaque = f"the head reads token(s) {bad} by position, beyond the {layout.prefix} leading token(s) kept in place"
    if layout.attention_pools:
        layout.pooling = "attention"
    elif layout.mean_pools:
        layout.pooling = "mean"
    elif layout.reads:
        layout.pooling = "cls"
    else:
        layout.pooling = "tokens"
