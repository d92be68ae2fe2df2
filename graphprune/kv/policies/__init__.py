"""The KV-cache policies: one file per published method (each registers itself)."""

from graphprune.kv.policies import (  # noqa: F401  (registers the policies)
    fastgen, h2o, kivi, lazyllm, pyramidinfer, pyramidkv, scissorhands, snapkv, streaming_llm, tova,
)
