"""The decoder side: KV-cache policies on Hugging Face causal LMs.

A policy (:class:`CachePolicy`) ranks cached slots from a read-only :class:`View`; the cache
layer protects, keeps the top slots per KV head, stores them (plain, ring, static or quantised)
and keeps validity and positions. ``graphprune.register`` adds a policy of your own.

Importing graphprune does not need transformers; the cache classes load it when first used.
"""

from graphprune.kv.model import (
    Decoder, DecoderInfo, KVReport, analyze_decoder, evicting_copy, input_ids, is_decoder_lm, optimize_decoder, positions,
)
from graphprune.kv.policy import CachePolicy, Chunk, Codec, KeyOverride, When, group_mean, slot_field
from graphprune.kv.view import View
from graphprune.kv import policies  # noqa: F401,E402  (registers the built-in policies)

__all__ = ["CachePolicy", "Decoder", "DecoderInfo", "EvictingCache", "EvictingLayer", "KVReport", "Chunk", "Codec", "KeyOverride", "View",
           "When", "analyze_decoder", "evicting_copy", "group_mean", "input_ids", "is_decoder_lm", "optimize_decoder",
           "positions", "slot_field"]


def __getattr__(name):
    if name in ("EvictingCache", "EvictingLayer"):
        from graphprune.kv import cache

        return getattr(cache, name)
    raise AttributeError(name)
