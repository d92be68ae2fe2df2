"""Decoder LLMs: KV-cache eviction (cache recipes) on Hugging Face causal LMs.

Importing graphprune does not need transformers; the cache classes load it when first used.
"""

from graphprune.kv.model import DecoderInfo, KVReport, analyze_decoder, evicting_copy, is_decoder_lm, optimize_decoder

__all__ = ["DecoderInfo", "EvictingCache", "EvictingLayer", "KVReport", "analyze_decoder", "evicting_copy",
           "is_decoder_lm", "optimize_decoder"]


def __getattr__(name):
    if name in ("EvictingCache", "EvictingLayer"):
        from graphprune.kv import cache

        return getattr(cache, name)
    raise AttributeError(name)
