"""Decoder LLMs: recognise a Hugging Face causal LM and give back a copy that evicts from its KV cache.

The copy shares the user's weights but has its own modules and config: its attention runs
the ``graphprune_kv`` function and every forward that starts a cache starts an
:class:`~graphprune.kv.cache.EvictingCache`. It keeps the standard forward
(``model(input_ids, past_key_values=..., use_cache=True)``) and ``generate``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphprune.errors import RecipeError, UnsupportedArchitectureError
from graphprune.kv.policy import CachePolicy

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3")  # rotate-half RoPE, cache.update +
# attention interface
VLMS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3")  # image
# placeholders in input_ids before a language model
MROPE = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text"}  # VLMs whose language model (a Qwen2 with
# multimodal RoPE) rotates by 3-D positions: see graphprune.kv.mrope


@dataclass
class DecoderInfo:
    """What the matcher found: one attention site per layer, GQA shape, and the RoPE frequencies."""

    family: str
    n_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    inv_freq: tuple[torch.Tensor | None, ...]  # each layer's RoPE frequencies (Gemma 3: local and global differ)
    media: tuple[int, ...] = ()  # a vision-language model's image and video placeholder ids (empty: text only)
    mrope: bool = False  # positions are the four rows of multimodal RoPE (graphprune.kv.mrope)
    class_token: bool = False  # each image is one grid of patches after the vision tower's class token (LLaVA-1.5)
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention)

    def fused_kv(self) -> tuple[slice, slice]:
        """Where the keys and the values lie in a fused q/k/v projection's output (Phi-3's ``qkv_proj``)."""
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return slice(q, q + kv), slice(q + kv, q + 2 * kv)


def is_decoder_lm(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(model, "generate") and not getattr(config, "is_encoder_decoder", False) \
        and getattr(config, "model_type", None) is not None and hasattr(model, "get_decoder")


def analyze_decoder(model) -> DecoderInfo:
    """Match the attention sites of a Hugging Face decoder (or of a vision-language model's language model); refuse
    what eviction cannot handle."""
    outer = model.config
    config = outer.get_text_config()
    family = config.model_type
    media = ()
    if config is not outer:  # a vision-language model
        if outer.model_type not in VLMS:
            raise UnsupportedArchitectureError(
                f"graphprune supports the vision-language models {', '.join(VLMS)}; this model is '{outer.model_type}'")
        media = tuple(i for i in (getattr(outer, "image_token_id", None), getattr(outer, "video_token_id", None))
                      if i is not None)
        if not media:
            raise UnsupportedArchitectureError(f"this '{outer.model_type}' config names no image token id")
    mrope = MROPE.get(outer.model_type) == family
    if family not in FAMILIES and not mrope:
        raise UnsupportedArchitectureError(
            f"KV-cache recipes support the decoder families {', '.join(FAMILIES)}; this model is '{family}'")
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(f"cannot find the decoder layers of this '{family}' model")
    types = getattr(config, "layer_types", None) or [  # (Mistral: one sliding window for every layer, when set)
        "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * len(layers)
    other = set(types) - {"full_attention", "sliding_attention"}
    if other:
        raise UnsupportedArchitectureError(f"this model has {', '.join(sorted(other))} layers; KV eviction supports "
                                           "full-attention and sliding-window layers")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(f"this '{family}' model rotates only part of each head "
                                           f"(partial_rotary_factor={config.partial_rotary_factor}); graphprune turns "
                                           "whole heads (re-rotation, renumbering): not supported yet")
    both_ways = getattr(config, "use_bidirectional_attention", False) and outer.model_type != "paligemma"  # (PaliGemma
    # sets it on its language model; its mask makes only the prefix bidirectional: attention_blocks)
    if getattr(config, "attn_logit_softcapping", None) is not None or both_ways:
        raise UnsupportedArchitectureError(f"this '{family}' model soft-caps its attention logits or attends both ways; "
                                           "graphprune's fused attention does neither")
    sites = [getattr(layer, "self_attn", None) for layer in layers]
    for i, attn in enumerate(sites):
        projections = ("q_proj", "k_proj", "v_proj") if not hasattr(attn, "qkv_proj") else ("qkv_proj",)  # (Phi-3:
        # one fused projection)
        if attn is None or not all(hasattr(attn, p) for p in (*projections, "o_proj")):
            raise UnsupportedArchitectureError(f"layer {i} has no q/k/v/o attention site")
        if getattr(attn, "layer_idx", i) != i:
            raise UnsupportedArchitectureError(f"layer {i}'s attention is numbered {attn.layer_idx}")
    rope = getattr(model.get_decoder(), "rotary_emb", None)
    inv_freq = tuple(getattr(rope, "inv_freq", getattr(rope, f"{t}_inv_freq", None)) for t in types)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderInfo(family, len(layers), config.num_attention_heads,
                       getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim,
                       inv_freq, media, mrope,
                       outer.model_type == "llava" and isinstance(getattr(outer, "vision_feature_layer", None), int)
                       and getattr(outer, "vision_feature_select_strategy", None) == "default",
                       tuple(config.sliding_window if t == "sliding_attention" else None for t in types))


def attention_blocks(model_type: str, token_type_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, L) the prompt's attention blocks as the model builds its mask from ``token_type_ids`` (tokens of one block
    >= 0 see each other both ways, -1: causal): PaliGemma's prefix (type 0: image and prompt) is one block, each of
    Gemma 3's images is one; None for other models."""
    if model_type == "paligemma":
        return torch.where(token_type_ids == 0, 0, -1)
    if model_type == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        return get_block_sequence_ids_for_mask(token_type_ids)
    return None


@dataclass
class KVReport:
    """What ``optimize`` did to a decoder: the recipe, its options and the attention sites it acts on."""

    recipe: str
    options: dict
    family: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Decoder:
    """What graphprune's copy of a decoder carries (as its class's ``graphprune``): the policy, the matched sites and
    the report; :meth:`new_cache` starts an evicting cache for it."""

    policy: CachePolicy
    info: DecoderInfo
    report: KVReport
    codecs: tuple = ()  # each layer's codec (the policy's, made from the model's weights), or none
    images: Callable | None = None  # the policy's image encoder (CachePolicy.image_encoder), or the model's own

    def new_cache(self, static: int | None = None, rows_plan: tuple[int, ...] | None = None):
        """An empty :class:`~graphprune.kv.cache.EvictingCache`; ``static``: a fixed slot count (capacity + static);
        ``rows_plan``: the rows each layer passes up in the prompt pass, fixed in advance (a static export)."""
        from graphprune.kv.cache import EvictingCache

        info = self.info
        return EvictingCache(self.policy, info.n_layers, info.inv_freq, static, info.media, info.windows, self.codecs,
                             rows_plan)


def _evicting_class(base: type, setup: Decoder) -> type:
    """A subclass of the model's class whose forward starts an evicting cache (the base class is untouched)."""
    forward = base.forward
    names = list(inspect.signature(forward).parameters)
    cache_key = "cache" if "cache" in names else "past_key_values"

    @functools.wraps(forward)
    def evicting_forward(self, *args, **kwargs):
        from graphprune.kv.cache import EvictingCache

        bound = dict(zip(names[1:], args))
        cache = kwargs.get(cache_key, bound.get(cache_key, kwargs.get("past_key_values")))
        use_cache = kwargs.get("use_cache", bound.get("use_cache"))
        if use_cache is None:
            use_cache = self.config.get_text_config().use_cache
        if not isinstance(cache, EvictingCache) and (cache is not None or use_cache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("graphprune: this model evicts from its own cache; pass the cache it returned "
                                 f"(an EvictingCache), not a filled {type(cache).__name__}")
            cache = setup.new_cache()
            if cache_key in bound:
                args = list(args)
                args[names[1:].index(cache_key)] = cache
            else:
                kwargs.pop("past_key_values", None)
                kwargs[cache_key] = cache
        skipped, lost = 0, None
        reduces = setup.policy.reduces_images or setup.policy.reduces_videos  # fewer image tokens go in
        if setup.info.mrope or reduces:  # (the call's arguments by name)
            kwargs, args = {**dict(zip(names[1:], args)), **kwargs}, ()
        if setup.info.mrope:  # every layer gets the text positions too
            from graphprune.kv.mrope import four_rows

            kwargs = four_rows(self, kwargs, 0 if cache is None else cache.get_seq_length())
        if reduces:
            from graphprune.kv.images import reduce_images

            kwargs, skipped, lost = reduce_images(self, setup.policy, setup.info.media, kwargs, setup.images)
            shift = None if cache is None else cache.shift
            if lost is None and shift is not None and kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] - shift[:, None]  # (renumbered: counted without them)
        if isinstance(cache, EvictingCache):
            types = kwargs.get("token_type_ids", bound.get("token_type_ids"))
            blocks = None if types is None or cache.get_seq_length() else attention_blocks(self.config.model_type, types)
            cache.begin(kwargs.get("input_ids", bound.get("input_ids")), blocks)
        out = forward(self, *args, **kwargs)
        if skipped and isinstance(cache, EvictingCache):
            if setup.policy.renumbers():
                cache.shift = lost
            else:
                cache.skip(skipped)
        return out

    members = {"forward": evicting_forward, "__module__": __name__, "graphprune": setup,
               "report": property(lambda self: self.graphprune.report)}
    if setup.images is not None:  # generate() would encode the images with the model's own tower before the prompt
        # pass: the pixels stay for the prompt pass, where the policy's encoder takes them
        members["_prepare_multimodal_encoder_kwargs_for_generation"] = lambda self, model_kwargs: model_kwargs
    return type(f"{base.__name__}WithKVEviction", (base,), members)


def evicting_copy(model, policy: CachePolicy, info: DecoderInfo):
    """A copy of ``model`` sharing its weights, whose KV cache evicts by ``policy``."""
    from graphprune.kv.cache import ATTENTION, hand_layer, register
    from graphprune.kv.rows import install as install_rows

    register()
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    new = copy.deepcopy(model, shared)
    report = KVReport(policy.name, policy.options(), info.family, info.n_layers, info.q_heads, info.kv_heads, info.head_dim)
    codecs = policy.layer_codecs(new, info)
    images = policy.image_encoder(new)
    new.__class__ = _evicting_class(type(model), Decoder(policy, info, report, tuple(codecs), images))
    new.config.get_text_config()._attn_implementation = ATTENTION  # (a vision tower keeps its own)
    for layer in new.get_decoder().layers:
        layer.self_attn.register_forward_pre_hook(hand_layer, with_kwargs=True)
    if policy.prunes_rows:
        install_rows(new, policy.revives, policy)
    return new


def optimize_decoder(model, policy):
    """``graphprune.optimize`` for decoder LLMs: a copy of ``model`` whose KV cache evicts by the cache ``policy``."""
    info = analyze_decoder(model) if is_decoder_lm(model) else None
    if getattr(policy, "kind", None) == "tokens" and info is not None and info.media:
        from graphprune.kv.tower import OnTower  # an encoder recipe inside a vision-language model's vision tower

        policy = OnTower(recipe=policy)
    if getattr(policy, "kind", None) != "cache":
        from graphprune.recipes import list_recipes

        cache = list_recipes("cache")
        raise RecipeError(f"'{policy.name}' reduces the tokens of encoders; decoder LLMs take a KV-cache recipe: "
                          f"{', '.join(cache)} (a LLaVA-1.5 vision-language model also takes it, inside its vision "
                          "tower)")
    if info is None:
        raise RecipeError(f"'{policy.name}' is a KV-cache recipe for Hugging Face decoder LLMs ({', '.join(FAMILIES)}); "
                          f"{type(model).__name__} is not one")
    if policy.needs_images and not info.media:
        raise RecipeError(f"'{policy.name}' prunes the image tokens of a vision-language model ({', '.join(VLMS)}); "
                          f"{type(model).__name__} has none")
    if policy.needs_class_token and not info.class_token:
        raise RecipeError(f"'{policy.name}' needs one grid of patches per image and the vision tower's class token "
                          f"(LLaVA-1.5, vision_feature_select_strategy='default'); {type(model).__name__} has not both")
    if info.mrope and policy.renumbers():
        raise RecipeError(f"positions='renumber' reproduces the renumbering of the authors' LLaVA code; "
                          f"{type(model).__name__} numbers image tokens in three dimensions: keep their positions "
                          "(positions='keep')")
    turns = type(policy).renumber is not CachePolicy.renumber and policy.renumbers()
    if turns and (None in info.inv_freq or any(f is not info.inv_freq[0] for f in info.inv_freq)):
        raise RecipeError(f"'{policy.name}' renumbers rows inside the language model by turning their rotary "
                          "embeddings; this model's layers rotate by different frequencies (or none graphprune can "
                          "read): keep the positions (positions='keep')")
    policy.fit(info.n_layers)
    return evicting_copy(model, policy, info)


def cache_argument(model) -> str:
    """The name of the cache argument of ``model``'s forward: ``cache`` (transformers ≥ 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The cache a model's forward returned (``output.cache``, or ``output.past_key_values`` before transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` computes them (padding at 1; it is masked anyway)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def input_ids(example_inputs) -> torch.Tensor:
    """The token ids among ``example_inputs`` (a tensor, a tuple starting with it, or a dict)."""
    if isinstance(example_inputs, dict):
        return example_inputs["input_ids"]
    return example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
