"""LLaVA-PruMerge and PruMerge+: Adaptive Token Reduction for Efficient Large Multimodal Models (Shang et al., 2024).

As in the authors' code (LLaVA-1.5, CLIP ViT-L/14): the vision tower's last layer's query and key projections, applied
(after its first norm) to the hidden states LLaVA takes, give the class token's attention over the patches as one
full-width head (softmax of q·kᵀ/√C over all tokens, the class row, patch columns). The patches whose attention lies
above Q3 + 1.5·IQR are kept (``keep="adaptive"``; or the top share ``keep``), in order of attention; PruMerge+ adds
every ⌊⌊1/r⌋/3⌋-th patch in raster order (r: the kept share) that is not kept yet. Each kept patch becomes itself plus
the sum of its 32 nearest other patches by key cosine similarity weighted by their class attention, and one more token
sums the dropped patches weighted the same way; these go through the projector and take the image's place (a shorter
sequence: positions close up). Differences: every image is reduced on its own (their outlier count is shared by the
batch), in float32 (theirs float16); where the kept and sampled patches and the extra token would not be fewer than
the image's tokens (a large ``keep`` with ``plus``; their code fails there), the image goes in as it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.kv.visual import ImagePolicy
from graphprune.recipes.base import option, register

NEIGHBOURS = 32  # the authors' k


def class_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(n,) the class token's attention over the patches: one head over the full width, softmax over all tokens."""
    att = ((q[:1].float() @ k.float().T) * q.shape[-1] ** -0.5).softmax(-1)
    return att[0, 1:]


def outliers(attention: torch.Tensor) -> int:
    """How many values lie above Q3 + 1.5·IQR (linear-interpolated quartiles)."""
    q1, q3 = torch.quantile(attention, 0.25), torch.quantile(attention, 0.75)
    return int((attention > q3 + 1.5 * (q3 - q1)).sum())


@register
@dataclass
class PruMerge(ImagePolicy):
    name = "prumerge"
    summary = "before the language model, keep the patches the vision tower's class token attends to most (IQR " \
              "outliers) and merge the others into their nearest kept ones"
    paper = "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (2024)"
    zero = {"keep": 1.0}
    sizes_itself = "keeps a data-dependent number of image tokens (set keep)"
    needs_class_token = True

    keep: Union[str, float] = option("adaptive", "'adaptive': the patches whose class attention is an IQR outlier; "
                                                 "a share in (0, 1]: that many of the top patches (1.0: no reduction)")
    plus: bool = option(False, "PruMerge+: add spatially uniform patches (every ⌊⌊1/r⌋/3⌋-th in raster order)")

    def validate(self) -> None:
        super().validate()
        if self.keep != "adaptive" and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                        or not 0 < self.keep <= 1):
            raise ScheduleError(f"keep must be 'adaptive' or a share in (0, 1], got {self.keep!r}")

    def merge_image(self, image):
        if self.keep == 1.0:
            return None
        vision = image.vision
        if vision is None:
            raise RecipeError("prumerge needs one grid of patches per image and the vision tower's class token "
                              "(LLaVA-1.5); this model's images have not both")
        q, k = vision.queries_keys(-1)
        attention = class_attention(q, k)
        patches = vision.hidden[1:].float()
        n = patches.shape[0]
        count = outliers(attention) if self.keep == "adaptive" else int(n * self.keep)
        chosen = attention.topk(count).indices  # by attention, highest first
        if self.plus and count > 0:
            stride = int(int(1 / (count / n)) / 3)  # ⌊⌊1/r⌋/3⌋ with r = count / n, computed as the authors' code does
            if stride > 0:
                extra = torch.arange(0, n - 1, stride, device=chosen.device)
                chosen = torch.cat([chosen, extra[~torch.isin(extra, chosen)]])
        if len(chosen) + 1 >= n:  # (no fewer tokens: the image goes in as it is)
            return None
        dropped = torch.ones(n, dtype=torch.bool, device=chosen.device)
        dropped[chosen] = False
        keys = torch.nn.functional.normalize(k[1:].float(), dim=-1)
        similarity = keys[chosen] @ keys.T  # (kept, n)
        similarity[torch.arange(len(chosen), device=chosen.device), chosen] = -torch.inf  # (never a patch's own neighbour)
        near = similarity.topk(min(NEIGHBOURS, n - 1), dim=-1).indices  # (kept, k)
        merged = patches[chosen] + (patches[near] * attention[near, None]).sum(1)
        rest = (patches[dropped] * attention[dropped, None]).sum(0, keepdim=True)
        return vision.project(torch.cat([merged, rest]).to(vision.hidden.dtype))
