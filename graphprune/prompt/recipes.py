"""The prompt-compression recipes: ``graphprune.optimize(llm, recipe="llmlingua", rate=0.5, tokenizer=tok)`` returns a
model whose ``generate`` compresses each prompt first (:func:`graphprune.compress_prompt` does it to text)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graphprune.errors import RecipeError, ScheduleError
from graphprune.prompt.lingua import compress_prompt
from graphprune.recipes.base import Recipe, option, register


class CompressingLM(torch.nn.Module):
    """A language model whose ``generate`` compresses each prompt with its recipe before generating; its forward is
    the model's. ``generate`` returns the original prompt ids followed by the new tokens (so slicing by the prompt's
    length still gives the answer); ``last`` holds the last call's compression results (one dict per prompt)."""

    def __init__(self, model, recipe: "LLMLingua"):
        super().__init__()
        self.model, self.recipe = model, recipe
        self.last: list[dict] = []

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, question: str | None = None,
                 **kwargs):
        """Compress each prompt (its text without special tokens; ``question``: kept after it, and what
        LongLLMLingua's scores are conditioned on), encode it again, and generate from the compressed prompts."""
        rec = self.recipe
        tok = rec.tokenizer
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        texts, self.last = [], []
        for ids, m in zip(input_ids, mask):
            text = tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            out = rec.compress(text, question or "", self.model)
            self.last.append(out)
            texts.append(out["compressed_prompt"])
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(input_ids.device) for k, v in enc.items()}
        out = self.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return torch.cat([input_ids, sequences[:, enc["input_ids"].shape[1]:]], 1)


@register
@dataclass
class LLMLingua(Recipe):
    name = "llmlingua"
    kind = "prompt"
    summary = "compress the prompt before the model: a small LM drops, segment by segment, the tokens it finds least " \
              "informative (budget controller and iterative token-level compression)"
    paper = "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models (EMNLP 2023)"
    zero = {"rate": 1.0}
    method = "llmlingua"

    rate: float = option(0.5, "share of the prompt's tokens kept (1.0: the prompt as it is)")
    tokenizer: object = option(None, "the model's tokenizer: prompts are decoded, compressed and encoded again "
                                     "(required)")
    compressor: object = option(None, "the small causal LM that scores the tokens (default: the model itself)")
    compressor_tokenizer: object = option(None, "the compressor's tokenizer (default: tokenizer)")
    iterative_size: int = option(200, "tokens per segment of the iterative compression")

    def validate(self) -> None:
        if not 0 < self.rate <= 1:
            raise ScheduleError(f"rate is the share of tokens kept, in (0, 1], got {self.rate}")
        if self.tokenizer is None:
            raise RecipeError(f"'{self.name}' decodes, compresses and encodes prompts again: pass tokenizer= (the "
                              "model's tokenizer)")

    def options(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "restore_tokens":
                continue
            v = getattr(self, f.name)
            out[f.name] = type(v).__name__ if f.name in ("tokenizer", "compressor", "compressor_tokenizer") and \
                v is not None else v
        return out

    @classmethod
    def describe_options(cls):
        return [o for o in super().describe_options() if o[0] != "restore_tokens"]

    def apply(self, graph):
        raise RecipeError(f"'{self.name}' compresses the prompts of a language model's generate; optimize a causal "
                          "LM (with tokenizer=), or compress text with graphprune.compress_prompt")

    def compress(self, text: str, question: str, model) -> dict:
        return compress_prompt(text, compressor=self.compressor if self.compressor is not None else model,
                               tokenizer=self.compressor_tokenizer or self.tokenizer, question=question,
                               rate=self.rate, iterative_size=self.iterative_size, **self.extra())

    def extra(self) -> dict:
        return {"method": self.method}

    def wrap(self, model) -> CompressingLM:
        if not hasattr(model, "generate"):
            raise RecipeError(f"'{self.name}' compresses the prompts of a language model's generate; "
                              f"{type(model).__name__} has none")
        return CompressingLM(model, self)


@register
@dataclass
class LongLLMLingua(LLMLingua):
    name = "longllmlingua"
    summary = "LLMLingua with question-aware scores: each token's surprise without the question minus with it " \
              "(give generate(question=...))"
    paper = "LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt Compression (ACL 2024)"
    method = "longllmlingua"

    condition_compare: bool = option(True, "contrastive token scores (with and without the question)")

    def extra(self) -> dict:
        return {"method": self.method, "condition_compare": self.condition_compare}
