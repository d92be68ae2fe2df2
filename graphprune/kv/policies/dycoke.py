"""DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (Tao et al., CVPR 2025).

As in the authors' code (KD-TAO/DyCoke at dd74634, ``llava_arch.py`` and their Qwen2 model file), two stages:

- **Temporal token merging**, before the language model, on each video's projected tokens frame by frame (n per
  frame, in the same spatial order): in pairs of frames (0, 1), (2, 3), … the second keeps only its int((1−K)·n)
  tokens least similar (cosine, token to token at the same place) to the first's; then in windows of four frames
  (0–3, 4–7, …, all but the last window) the third frame is compared with the window's first frame instead (both
  unpruned) and keeps its least similar tokens the same way. An odd last frame is left out (their frame pairs do not
  reach it). Dropped, not averaged, despite the name.
- **Dynamic KV-cache pruning**, at every decoding step: the new token's attention in layer L−1 (softmax over every
  slot, mean over all query heads) is read on the video tokens; unless it is as similar as 0.9 (cosine) to the
  previous step's, the layers from L on attend, in this step, to the top int(n·(1−P)) video tokens only (n: the
  prompt's video tokens; text and generated tokens always). The full cache stays: a token left out at one step can be
  attended to at the next.

Published settings: L = 3, P = 0.7, K = 0.7 (the README; their lmms-eval default is P = 0.8). Only video tokens are
candidates. Kept tokens keep their positions (their code's sequence is shorter and its tokens are in similarity
order; with kept positions, order is the frame's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.rows import by_position
from graphprune.kv.visual import ImagePolicy
from graphprune.recipes.base import option, register

GATE = 0.9  # a decoding step whose video attention is this similar to the last step's is not pruned (their constant)


@dataclass
class Attention:
    video: torch.Tensor | None = None  # (B, T) bool by position: the prompt's video tokens
    previous: torch.Tensor | None = None  # (B, T) the last decoding step's attention on them, by position


def least_similar(first: torch.Tensor, second: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (keep,) of the tokens of frame ``second`` (n, C) least similar to ``first``'s at the same place."""
    s = torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1)
    return s.topk(keep, largest=False).indices


def temporal_merge(features: torch.Tensor, frames: int, merge: float) -> torch.Tensor:
    """DyCoke's kept tokens of one video (frames × n tokens, ``features`` (frames·n, C)): sorted indices."""
    n = features.shape[0] // frames
    f = features.view(frames, n, -1)
    keep = int((1 - merge) * n)
    kept = {i: torch.arange(n, device=features.device) for i in range(0, frames - 1, 2)}  # (an odd last frame: none)
    for i in range(0, frames - 1, 2):
        kept[i + 1] = least_similar(f[i], f[i + 1], keep)
    for i in range(0, frames - 4, 4):
        kept[i + 2] = least_similar(f[i], f[i + 2], keep)
    return torch.cat([kept[i] + i * n for i in sorted(kept)]).sort().values


@register
@dataclass
class DyCoke(ImagePolicy):
    name = "dycoke"
    summary = "video: drop each frame's tokens most similar to its neighbour frame's before the language model, and " \
              "attend to the video tokens the new token attends to most at every decoding step"
    paper = "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (CVPR 2025)"
    zero = {"merge": 0.0, "prune": 0.0}
    sizes_itself = "reduces video tokens by its own options (set merge, prune)"
    State = Attention

    layer: int = option(3, "L: decoding steps attend to the pruned video tokens from this layer on (scored in L−1)")
    prune: float = option(0.7, "P: share of the video tokens each decoding step leaves out")
    merge: float = option(0.7, "K: share of a compared frame's tokens temporal merging drops")

    def validate(self) -> None:
        super().validate()
        for name in ("prune", "merge"):
            if not 0 <= getattr(self, name) < 1:
                raise ScheduleError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ScheduleError(f"layer must be a layer index ≥ 1, got {self.layer}")

    def fit(self, n_layers):
        if self.layer >= n_layers:
            raise ScheduleError(f"layer must lie below the model's {n_layers} layers, got {self.layer}")

    def video_tokens(self, video):
        if self.merge == 0:
            return None
        return temporal_merge(video.features, video.frames, self.merge)

    def rows(self, view):
        if view.layer != self.layer - 1 or self.prune == 0:
            return None
        st = view.state
        if view.prefill:  # where the prompt's video tokens are
            if view.video is not None and bool(view.video.any()):
                st.video = by_position(view.query_pos, view.video & view.query_real, int(view.query_pos.max()) + 1)
            return None
        if st.video is None or view.n_new != 1:
            return None
        span = st.video.shape[1]
        pos = view.positions[:, 0]
        video = view.valid[:, 0] & (pos < span) & st.video.gather(1, pos.clamp(max=span - 1))
        attention = view.attention_rows(1)[..., -1, :].mean(dim=(1, 2)).masked_fill(~video, 0)  # (B, N)
        now = torch.zeros_like(st.video, dtype=attention.dtype).scatter_add_(1, pos.clamp(max=span - 1), attention)
        similar = torch.zeros(now.shape[0], dtype=torch.bool, device=now.device) if st.previous is None else \
            torch.nn.functional.cosine_similarity(now, st.previous, dim=-1) >= GATE
        st.previous = now
        keep = (st.video.sum(-1).double() * (1 - self.prune)).long()
        rank = attention.masked_fill(~video, -torch.inf).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return video & (rank >= keep[:, None]) & ~similar[:, None]
