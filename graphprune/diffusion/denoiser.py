"""Denoisers: recognise a diffusers UNet or diffusion transformer, and give back a copy whose transformer blocks
merge tokens before their attention (and optionally cross-attention and MLP) and unmerge after it.

The copy shares the user's weights but has its own module tree: each matched block is wrapped so that its input
tokens are matched once per call, and each reduced op inside it is wrapped to merge its token input and unmerge its
output, so the residual stream keeps its shape (ToMe for Stable Diffusion). The user's model, its modules and its
classes are untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from graphprune.diffusion.merge import Grid, Merge, draw_cells
from graphprune.errors import UnsupportedArchitectureError

DENOISERS = ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
             "FluxTransformer2DModel")


def denoiser_of(model) -> tuple[str | None, torch.nn.Module]:
    """(attribute name in the pipeline, denoiser) of a diffusers pipeline; (None, model) for anything else."""
    for name in ("unet", "transformer"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module) and hasattr(model, "components"):
            return name, inner
    return None, model


def is_diffusion(model) -> bool:
    """A diffusers denoiser or pipeline (by the classes' own module, without importing diffusers)."""
    root = type(denoiser_of(model)[1]).__module__.split(".")[0]
    return root == "diffusers" or type(model).__module__.split(".")[0] == "diffusers"


def check_denoiser(model: torch.nn.Module) -> None:
    kind = type(model).__name__
    if kind not in DENOISERS:
        raise UnsupportedArchitectureError(f"{kind} is not a denoiser graphprune knows; supported: {', '.join(DENOISERS)}"
                                           " (diffusers)")


# --------------------------------------------------------------------------------------------- per call state

class Draws:
    """What each block call of one denoiser call draws and decides. The destination cells come from a generator, as
    the published code draws them (one ``randint`` per block call, the same for every sample of the batch; none for an
    odd batch, whose classifier-free guidance halves are not in one batch: top-left then), or a given list (an
    exported graph's inputs). The matchings are the call's own, or ``decided``: (order, choice) per block call, taken
    from an exported graph's run (its parity check replays them)."""

    def __init__(self, generator: torch.Generator | None = None, given: list[torch.Tensor] | None = None,
                 decided: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.generator, self.given, self.decided = generator, given, decided
        self.log: list[tuple[Grid, torch.Tensor]] = []  # (grid, cells) of each block call so far
        self.merges: list[Merge] = []  # the matching of each block call so far

    def match(self, x: torch.Tensor, grid: Grid, cells: torch.Tensor, r: int) -> Merge:
        decided = self.decided[len(self.merges)] if self.decided is not None else None
        self.merges.append(Merge(x, grid, cells, r, decided))
        return self.merges[-1]

    def next(self, grid: Grid, batch: int, use_rand: bool, device) -> torch.Tensor:
        if self.given is not None:
            if len(self.log) >= len(self.given):
                raise ValueError(f"{len(self.given)} cell tensors given, but the denoiser reduces more block calls")
            cells = self.given[len(self.log)]
        else:
            random = use_rand and batch % 2 == 0 and self.generator is not None
            cells = _draw(grid, self.generator) if random else draw_cells(grid, None)
        self.log.append((grid, cells))
        return cells.to(device)


# The draws run outside a torch.compile'd graph (a generator's state is Python-side); the rest compiles.
_draw = torch.compiler.disable(draw_cells)


@dataclass
class Call:
    """One forward of the denoiser: its latent grid, the ratio for this timestep and the cell draws."""

    size: tuple[int, int]  # (rows, columns) of the latent at full resolution, in tokens of the first blocks
    ratio: float
    draws: Draws
    merges: list[Merge | None] = field(default_factory=list)  # the block now running (a stack: blocks do not nest)


@dataclass
class Settings:
    """What the recipe asks of every block."""

    max_downsample: int
    sx: int
    sy: int
    use_rand: bool
    ops: frozenset[str]  # of "attn" (self- and joint attention), "crossattn", "mlp"


class _Run:
    """The call in progress (set by :class:`ReducedDenoiser` around the copy's forward)."""

    def __init__(self):
        self.call: Call | None = None


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _replace_hidden(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": value}
    return (value, *args[1:]), kwargs


class _Wrapper(torch.nn.Module):
    """A module standing in for ``inner`` (the copy's own): attributes it lacks are the inner module's, since models
    read their blocks' parts (DiT: ``transformer_blocks[0].norm1``)."""

    def __init__(self, inner: torch.nn.Module, run: _Run):
        super().__init__()
        self.inner, self.run = inner, run

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "inner" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["inner"], name)


class MatchedBlock(_Wrapper):
    """A transformer block whose input tokens are matched once per call (the published code's ``compute_merge``)."""

    def __init__(self, block: torch.nn.Module, run: _Run, settings: Settings, stream: bool = False):
        super().__init__(block, run)
        self.settings = settings
        self.stream = stream  # text and image tokens in one stream inside the block (Flux's single blocks)

    def forward(self, *args, **kwargs):
        call, s = self.run.call, self.settings
        if call is None:
            return self.inner(*args, **kwargs)
        x = _hidden(args, kwargs)
        merge = None
        if call.ratio > 0 and x.dim() == 3:
            rows, cols = call.size
            n = x.shape[1]
            down = math.ceil(math.sqrt(rows * cols // n))
            if down <= s.max_downsample:
                grid = Grid(h=math.ceil(rows / down), w=math.ceil(cols / down), sx=s.sx, sy=s.sy)
                if grid.h * grid.w != n:
                    raise UnsupportedArchitectureError(f"a block's {n} tokens are not the {grid.h}×{grid.w} grid its "
                                                       f"latent implies; token merging needs the image tokens alone")
                cells = call.draws.next(grid, x.shape[0], s.use_rand, x.device)
                merge = call.draws.match(x, grid, cells, int(n * call.ratio))
        text = 0
        if merge is not None and self.stream:  # the ops see the text tokens first, then the image tokens
            text = (kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]).shape[1]
        call.merges.append(None if merge is None else (merge, text))
        try:
            return self.inner(*args, **kwargs)
        finally:
            call.merges.pop()


class ReducedOp(_Wrapper):
    """An op inside a matched block (attention, cross-attention, MLP) that runs on the merged tokens: its token input
    (``hidden_states``, the first argument; past the text tokens in a one-stream block) is merged, its output (or its
    output's first element, the image tokens of a joint attention) unmerged. With rotary embeddings
    (``image_rotary_emb``, Flux) each merged token is rotated by the position of the token it stands at (a destination
    at its own); the positions differ per sample, so the op then runs once per sample."""

    def forward(self, *args, **kwargs):
        call = self.run.call
        entry = call.merges[-1] if call is not None and call.merges else None
        if entry is None:
            return self.inner(*args, **kwargs)
        merge, text = entry
        x = _hidden(args, kwargs)
        merged = merge.merge(x[:, text:])
        args, kwargs = _replace_hidden(args, kwargs, torch.cat([x[:, :text], merged], dim=1) if text else merged)
        rotary = kwargs.get("image_rotary_emb")
        out = self.inner(*args, **kwargs) if rotary is None else self._per_sample(args, kwargs, merge, rotary)

        def unmerge(y):
            return torch.cat([y[:, :text], merge.unmerge(y[:, text:])], dim=1) if text else merge.unmerge(y)

        if isinstance(out, tuple):
            return (unmerge(out[0]), *out[1:])
        return unmerge(out)

    def _per_sample(self, args: tuple, kwargs: dict, merge: Merge, rotary):
        """Run the op with each sample's rotary embeddings: the text tokens' (in front) and the merged tokens'."""
        cos, sin = rotary
        text = cos.shape[0] - merge.n
        batch = _hidden(args, kwargs).shape[0]
        at = torch.cat([torch.arange(text, device=cos.device).expand(batch, -1), merge.positions() + text], dim=1)

        def sample(v, b):
            return v[b:b + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v

        outs = [self.inner(*(sample(a, b) for a in args),
                           **{**{k: sample(v, b) for k, v in kwargs.items()}, "image_rotary_emb": (cos[at[b]], sin[at[b]])})
                for b in range(batch)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts, dim=0) for parts in zip(*outs))
        return torch.cat(outs, dim=0)


def per_sample(reduced: "ReducedDenoiser") -> bool:
    """Whether the reduced denoiser runs each sample's attention apart (rotary positions: Flux), so that an exported
    step has a static batch."""
    return type(reduced.inner).__name__ == "FluxTransformer2DModel"


# --------------------------------------------------------------------------------------------- the copy

def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s tree: new module objects (own ``_modules`` dicts, so children can be replaced), the same
    parameters and buffers."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: shared_copy(v) if v is not None else None for k, v in module._modules.items()}
    return new


def _ops(block: torch.nn.Module) -> tuple[dict[str, str], bool] | None:
    """The reducible ops of a block, by kind, and whether the block runs text and image tokens in one stream:
    BasicTransformerBlock-like (``attn1``, ``attn2``, ``ff``), a joint text–image block (``attn`` with a context branch,
    ``attn2`` as extra self-attention, ``ff``) or a one-stream block (Flux's single blocks: ``attn`` and ``proj_mlp``
    side by side on text and image tokens); None for other modules."""
    children = dict(block.named_children())
    if "attn1" in children and "ff" in children:
        ops = {"attn1": "attn", "ff": "mlp"}
        if children.get("attn2") is not None:
            ops["attn2"] = "crossattn"
        return ops, False
    if "attn" in children and "ff" in children and ("ff_context" in children or "norm1_context" in children):
        ops = {"attn": "attn", "ff": "mlp"}
        if children.get("attn2") is not None:
            ops["attn2"] = "attn"
        return ops, False
    if "attn" in children and "proj_mlp" in children and "proj_out" in children:
        return {"attn": "attn", "proj_mlp": "mlp"}, True
    return None


def rewrite(model: torch.nn.Module, settings: Settings, run: _Run) -> tuple[torch.nn.Module, list[str]]:
    """The weight-sharing copy with every transformer block matched and its ops (those ``settings.ops`` names)
    reduced; returns (copy, the blocks' names)."""
    root = shared_copy(model)
    names = []
    for name, block in list(root.named_modules()):
        found = _ops(block)
        if found is None:
            continue
        ops, stream = found
        for child, kind in ops.items():
            if kind in settings.ops:
                block._modules[child] = ReducedOp(block._modules[child], run)
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        parent._modules[leaf] = MatchedBlock(block, run, settings, stream)
        names.append(name)
    return root, names


def _sample(args: tuple, kwargs: dict) -> torch.Tensor:
    """The latent of a denoiser call (the first argument, or ``sample`` / ``hidden_states``)."""
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


def latent_size(model: torch.nn.Module, sample: torch.Tensor, kwargs: dict) -> tuple[int, int]:
    """The token grid of the first blocks: the latent's (H, W) for a UNet, (H / p, W / p) for a transformer with
    patches of ``p``; for packed tokens (Flux: ``(B, N, C)``) the rows and columns of their ``img_ids``."""
    if sample.dim() == 3:
        ids = kwargs.get("img_ids")
        if ids is None:
            raise UnsupportedArchitectureError("packed image tokens (B, N, C) need img_ids (their rows and columns) to "
                                               "find their grid")
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    h, w = sample.shape[-2:]
    p = getattr(getattr(model, "config", None), "patch_size", None) or 1
    return math.ceil(h / p), math.ceil(w / p)


class ReducedDenoiser(_Wrapper):
    """The denoiser with ToMe for SD in its transformer blocks: called as the original is called (any signature, the
    original's output type), with the same attributes (``config``, ``dtype``, ...). ``ratio``: the share of each
    reduced block's tokens merged, a number, a list (one per denoising step: the step advances when the timestep
    changes and starts again when it rises) or a function of the timestep."""

    def __init__(self, model: torch.nn.Module, settings: Settings, ratio, seed: int | None):
        run = _Run()
        inner, blocks = rewrite(model, settings, run)
        if not blocks:
            raise UnsupportedArchitectureError(
                f"this {type(model).__name__} has no transformer blocks (self-attention with an MLP after it) where "
                f"ToMe for SD merges tokens: nothing to reduce; use the model as it is")
        super().__init__(inner, run)
        self.blocks = blocks
        self.settings, self.ratio, self.seed = settings, ratio, seed
        self._generator: torch.Generator | None = None
        self._step, self._last_t = -1, None

    @torch.compiler.disable
    def generator(self, device: torch.device) -> torch.Generator:
        """The cells' own generator (the diffusion's noise is not affected): seeded with ``seed``, or, without one, a
        fork of the global RNG at the first call, as the published code does."""
        if self._generator is None or self._generator.device != device:
            g = torch.Generator(device)
            if self.seed is not None:
                g.manual_seed(self.seed)
            elif device.type == "cuda":
                g.set_state(torch.cuda.get_rng_state(device))
            else:
                g.set_state(torch.get_rng_state())
            self._generator = g
        return self._generator

    def ratio_at(self, timestep) -> float:
        if not callable(self.ratio) and not isinstance(self.ratio, (list, tuple)):
            return float(self.ratio)
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else timestep
        if callable(self.ratio):
            return float(self.ratio(t))
        if t is None:
            raise ValueError("a ratio per step needs the timestep argument")
        if self._last_t is None or t > self._last_t:
            self._step = 0
        elif t != self._last_t:
            self._step += 1
        self._last_t = t
        return float(self.ratio[min(self._step, len(self.ratio) - 1)])

    def latent_size(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        """The token grid of the first blocks for a call with these arguments."""
        return latent_size(self.inner, _sample(args, kwargs), kwargs)

    def call(self, args: tuple, kwargs: dict, draws: Draws | None = None, size: tuple[int, int] | None = None):
        """Run the reduced copy; ``draws``: the cells to use (default: this model's generator); ``size``: the token
        grid, if known (an exported graph fixes it; Flux's is read from the values of ``img_ids``)."""
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        draws = draws or Draws(self.generator(_sample(args, kwargs).device) if self.settings.use_rand else None)
        self.run.call = Call(size=size or self.latent_size(args, kwargs), ratio=self.ratio_at(timestep), draws=draws)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.run.call = None

    def forward(self, *args, **kwargs):
        return self.call(args, kwargs)

