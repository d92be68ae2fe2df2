"""Decoder LLMs: KV-cache eviction (cache recipes) on Hugging Face causal LMs."""

from graphprune.kv.cache import EvictingCache, EvictingLayer
from graphprune.kv.model import DecoderInfo, KVReport, analyze_decoder, evicting_copy, is_decoder_lm, optimize_decoder

__all__ = ["DecoderInfo", "KVReport", "optimize_decoder", "EvictingCache", "EvictingLayer", "analyze_decoder", "evicting_copy", "is_decoder_lm"]
