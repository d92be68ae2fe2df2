"""Prompt compression before the model: a small causal LM scores the prompt's tokens and the least informative go
(LLMLingua, LongLLMLingua)."""

from graphprune.prompt import recipes  # noqa: F401  (registers llmlingua and longllmlingua)
from graphprune.prompt.lingua import compress_prompt

__all__ = ["compress_prompt"]
