"""LLMLingua (Jiang et al., EMNLP 2023) and LongLLMLingua (Jiang et al., ACL 2024): prompt compression by a small LM.

A budget controller keeps whole contexts (demonstrations, documents) by rank until the target is spent (plus
``context_budget``), then iterative token-level compression walks the kept text in segments of ``iterative_size``
tokens: each segment is scored by the compressor conditioned on the compressed text before it (its keys and values
reused), and in each segment the tokens whose following token the compressor finds least surprising go, at the
segment's rate (a quantile of the scores of the whole current sequence). LongLLMLingua ranks documents by how likely
the question is after each (with the paper's restrictive suffix), reorders them, gives better-ranked documents a
higher rate (``dynamic_ratio``), and with ``condition_compare`` scores tokens contrastively: their surprise without
the question minus with it.

As the authors' package (``llmlingua`` 0.2.2, ``PromptCompressor.compress_prompt``): its rate and budget arithmetic,
its segment plan (the first segment one token short), its keep rule (a token stays when the next token's loss is above
the threshold: the package's own convention) and its last partial segment left as it is. Differences, by design:
token counts are the compressor tokenizer's (the package counts with tiktoken's GPT-3.5 encoding); a prompt shorter
than one segment is compressed (the package's first window reaches before the text there and keeps nearly all of it);
no key/value eviction for prompts longer than the compressor's context; no sentence-level filter, no ``keep_split``,
and LongLLMLingua's subsequence recovery of the answer is not included; the compressed text is decoded as the
installed transformers decodes (transformers 5 no longer removes the space before punctuation for BPE tokenizers,
which 4.x did when ``clean_up_tokenization_spaces`` is set: the same tokens, a different string); ``rate=1.0`` returns the prompt as it is (the
package still drops a few tokens there: its per-token rate divides by the contexts' lengths plus their separators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import ScheduleError
from graphprune.kv.model import cache_argument, returned_cache

SUFFIX = " We can get the answer to this question in the given documents."


@dataclass
class _Scorer:
    model: object
    tokenizer: object

    def ids(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def length(self, text: str, special: bool = True) -> int:
        return len(self.ids(text, special))

    @torch.no_grad()
    def losses(self, ids: torch.Tensor, past=None, end: int | None = None):
        """Per-token NLL of ``ids[past_len + 1:end]`` given what precedes (``past``: the cache of ``ids[:past_len]``),
        and the cache of ``ids[:end]``. The compressor runs on its own device; the losses come back on ``ids``'s."""
        past_len = 0 if past is None else past.get_seq_length()
        end = ids.shape[0] if end is None else end
        on = ids[:end].to(self.model.get_input_embeddings().weight.device)
        out = self.model(on[None, past_len:], **{cache_argument(self.model): past}, use_cache=True)
        logits = out.logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, on[past_len + 1:], reduction="none")
        return losses.to(ids.device), returned_cache(out)


def _budget(expression: str, base: float) -> float:
    """The context budget: ``base`` followed by ``+N`` or ``*F`` (the package's ``context_budget``)."""
    expression = expression.replace(" ", "")
    try:
        if expression.startswith("+"):
            return base + float(expression[1:])
        if expression.startswith("*"):
            return base * float(expression[1:])
    except ValueError:
        pass
    raise ScheduleError(f"context_budget must be '+N' or '*F', got {expression!r}")


def _rank(scorer: _Scorer, contexts: list[str], question: str, method: str) -> list[int]:
    """Context indices, best first: LLMLingua by each context's mean token loss (highest first); LongLLMLingua by the
    mean loss of the question (and the restrictive suffix) after each context (lowest first)."""
    scores = []
    for text in contexts:
        if method == "llmlingua":
            ids = torch.tensor(scorer.ids(text))
            scores.append(-float(scorer.losses(ids)[0].mean()) if len(ids) > 1 else 0.0)
        else:
            ids = torch.tensor(scorer.ids(text + question + SUFFIX))
            first = scorer.length(text) - 1
            scores.append(float(scorer.losses(ids)[0][first:].mean()))
    return sorted(range(len(contexts)), key=lambda i: scores[i])


def _plan(lengths: list[int], rates: list[float], size: int) -> list[list[tuple[int, float]]]:
    """Segments of ``size`` tokens over the contexts (each ``lengths[i]`` long, at ``rates[i]``), as lists of (tokens,
    rate) pieces; the first segment is one token short (the package's count starts at one)."""
    plan, filled, pieces = [], 1, []
    for n, rate in zip(lengths, rates):
        if filled + n >= size:
            pieces.append((size - filled, rate))
            plan.append(pieces)
            filled = filled + n - size
            if filled > size:
                whole = filled // size
                plan.extend([[(size, rate)]] * whole)
                filled -= whole * size
            pieces = [(filled, rate)] if filled else []
        else:
            filled += n
            pieces.append((n, rate))
    if pieces:
        plan.append(pieces)
    return plan


def _truncate(past, length: int) -> None:
    """Keep the cache's first ``length`` positions."""
    extra = past.get_seq_length() - length
    if extra > 0:
        past.crop(-extra)


def _threshold(scores: torch.Tensor, rate: float) -> float:
    if rate >= 1.0:
        return -math.inf
    k = max(0, min(len(scores) - 1, int(len(scores) * rate) - 1))
    return float(scores.sort(descending=True).values[k])


def _iterate(scorer: _Scorer, contexts: list[str], plan, size: int, start: int, contrast: bool) -> torch.Tensor:
    """Iterative token-level compression of ``"\\n\\n".join(contexts)`` (the first ``start`` tokens a question
    prefix, always kept and dropped at the end); returns the kept ids."""
    ids = torch.tensor(scorer.ids("\n\n".join(contexts), special=False))
    plain = ids[start:] if contrast else None  # the same text without the question (contrastive scores)
    end = min(size + start, len(ids))
    loss = plain_loss = None
    past = plain_past = None
    ready = plain_ready = 0
    for idx, segment in enumerate(plan):
        if end > len(ids):
            break
        new, past = scorer.losses(ids, past, end if idx else None)
        if len(new) == 0:
            break
        loss = new if loss is None else torch.cat([loss, loss.new_zeros(max(0, end - 1 - len(loss)))])
        if idx:
            loss[ready:end - 1] = new
            _truncate(past, end - size)
        else:
            past = None
        if contrast:
            new, plain_past = scorer.losses(plain, plain_past, end - start if idx else None)
            plain_loss = new if plain_loss is None else \
                torch.cat([plain_loss, plain_loss.new_zeros(max(0, end - start - 1 - len(plain_loss)))])
            if idx:
                plain_loss[plain_ready:end - start - 1] = new
                _truncate(plain_past, end - size - start)
            else:
                plain_past = None
            plain_ready = end - start - size if not (start and idx == 0) else 0
        ready = end - size if not (start and idx == 0) else 0
        for n, rate in segment:
            score = plain_loss[:len(loss) - start] - loss[start:] if contrast else loss
            theta = _threshold(score, rate)
            stop = end - size + n  # the piece: tokens [stop - n, stop)
            if contrast:
                keep = torch.cat([loss[:start] > 0, score > theta, torch.ones(1, dtype=torch.bool)])
            else:
                keep = torch.cat([loss > theta, torch.ones(1, dtype=torch.bool)])
            keep[stop:] = True
            keep[:max(stop - n, start)] = True
            keep = torch.cat([keep, torch.ones(max(0, len(ids) - len(keep)), dtype=torch.bool)])[:len(ids)]
            ids, loss = ids[keep], loss[keep[:len(loss)]]
            if contrast:
                plain_loss = plain_loss[keep[start:start + len(plain_loss)]]
                plain = plain[keep[start:]]
            end = stop - int((~keep[:stop]).sum()) + size
    return ids[start:]


def compress_prompt(context, *, compressor, tokenizer, instruction: str = "", question: str = "", rate: float = 0.5,
                    target_token: int | None = None, method: str = "llmlingua", iterative_size: int = 200,
                    context_budget: str = "+100", reorder: str = "original", dynamic_ratio: float = 0.0,
                    condition_compare: bool = False, use_context_filter: bool = True) -> dict:
    """Compress ``context`` (a string or a list of them: demonstrations, documents) for a prompt made of
    ``instruction``, the compressed context and ``question`` (those two are kept as they are), keeping about ``rate``
    of its tokens (or ``target_token`` context tokens), with the causal LM ``compressor`` and its ``tokenizer``.
    ``method``: "llmlingua" or "longllmlingua" (question-aware ranking; use ``reorder="sort"``,
    ``dynamic_ratio=0.3``, ``condition_compare=True`` for the paper's setting). Returns the package's fields:
    ``compressed_prompt``, ``origin_tokens``, ``compressed_tokens`` (the compressor tokenizer's counts), ``ratio``,
    ``rate``, and ``kept_contexts`` (indices, in their new order)."""
    if method not in ("llmlingua", "longllmlingua"):
        raise ScheduleError(f"method must be 'llmlingua' or 'longllmlingua', got {method!r}")
    if not 0 < rate <= 1:
        raise ScheduleError(f"rate is the share of tokens kept, in (0, 1], got {rate}")
    if reorder not in ("original", "sort", "two_stage"):
        raise ScheduleError(f"reorder must be 'original', 'sort' or 'two_stage', got {reorder!r}")
    if iterative_size < 2:
        raise ScheduleError("iterative_size must be at least 2 tokens")
    contexts = [context] if isinstance(context, str) else list(context)
    contexts = contexts or [" "]
    scorer = _Scorer(compressor, tokenizer)
    if rate == 1.0 and target_token is None:  # the prompt as it is
        kept_ids = torch.tensor(scorer.ids("\n\n".join(contexts), special=False))
        return _result(scorer, instruction, contexts, question, kept_ids, list(range(len(contexts))))
    conditioned = condition_compare and method == "longllmlingua" and bool(question)
    if target_token is None:
        target = rate * (scorer.length(instruction) + scorer.length(question) + sum(map(scorer.length, contexts))) \
            - scorer.length(instruction) - scorer.length(question)
    else:
        target = float(target_token)
    kept, deltas = list(range(len(contexts))), [0.0] * len(contexts)
    if use_context_filter and len(contexts) > 1:
        ranked = _rank(scorer, contexts, question, method)
        left, kept = _budget(context_budget, target if target >= 0 else 100), []
        for i in ranked:
            left -= scorer.length(contexts[i])
            kept.append(i)
            if left < 0:
                break
        n = len(kept)
        ramp = [dynamic_ratio * (n - 1 - 2 * r) / (n - 1) if n > 1 else 0.0 for r in range(n)]  # +δ … −δ by rank
        delta = dict(zip(kept, ramp))
        if reorder == "original":
            kept = sorted(kept)
        elif reorder == "two_stage":
            kept = kept[0::2] + kept[1::2][::-1]
        deltas = [delta[i] for i in kept]
    texts = [contexts[i] for i in kept]
    start = 0
    if conditioned:  # the question goes first and stays: its tokens are those whose text lies inside it
        prefix = question + "\n\n"
        joined, own = scorer.ids(prefix + "\n\n".join(texts), False), scorer.ids(prefix, False)
        start = len(own)
        if joined[:start] != own:  # a token spans the question and the context: it is the context's
            start = 0
            while start < len(joined) and prefix.startswith(tokenizer.decode(joined[:start + 1])):
                start += 1
        texts = [question] + texts
    lengths = [scorer.length(t, False) + 2 for t in texts[1 if conditioned else 0:]]
    tau = target / (sum(lengths) + 1)
    rates = [max(min(1.0, tau + d), 0.0) for d in deltas]
    kept_ids = _iterate(scorer, texts, _plan(lengths, rates, iterative_size), iterative_size, start, conditioned)
    return _result(scorer, instruction, contexts, question, kept_ids, kept)


def _result(scorer: _Scorer, instruction: str, contexts: list[str], question: str, kept_ids: torch.Tensor,
            kept: list[int]) -> dict:
    body = scorer.tokenizer.decode(kept_ids.tolist())
    parts = [p for p in (instruction, body if body.strip() else "", question) if p]
    prompt = "\n\n".join(parts)
    origin = scorer.length("\n\n".join([instruction, *contexts, question]).strip(), False)
    compressed = scorer.length(prompt, False)
    return {"compressed_prompt": prompt, "origin_tokens": origin, "compressed_tokens": compressed,
            "ratio": origin / max(compressed, 1), "rate": compressed / max(origin, 1), "kept_contexts": kept}
