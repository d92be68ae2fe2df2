"""Prompt compression (LLMLingua, LongLLMLingua) with a tiny compressor and a word-level tokenizer built in-process."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import graphprune
from graphprune.errors import ScheduleError

WORDS = [f"w{i}" for i in range(60)] + ["We", "can", "get", "the", "answer", "to", "this", "question", "in", "given",
                                        "documents.", "?"]


@pytest.fixture(scope="module")
def lm():
    vocab = {"[UNK]": 0, "[PAD]": len(WORDS) + 1, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # (joins words with spaces)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=2048)).eval()
    with torch.no_grad():  # peaked predictions: token losses far apart (no near-ties between scoring orders)
        model.lm_head.weight.mul_(30)
    return model, tokenizer


def _doc(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (n,), generator=g))


def _nll(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


def reference(model, tokenizer, docs: list[str], rates: list[float], size: int, question: str = "") -> list[int]:
    """Iterative token-level compression as the package defines it, recomputing every score from scratch: the text's
    tokens in windows of ``size`` (the first one token short), split where documents (each counted 2 tokens longer,
    for its separator) change rate; per window piece the threshold is the ⌊len·rate⌋-th largest score of the whole
    current sequence (a score: the loss of the token after), and a token of the piece stays if its score is above it.
    Each window is scored given the compressed text before it; tokens after it keep their first scores. With a
    ``question`` (LongLLMLingua's contrastive scores): the question and a blank line go first and always stay, and a
    token's score is its successor's loss without the question minus with it."""
    start = len(tokenizer(question + "\n\n", add_special_tokens=False)["input_ids"]) if question else 0
    ids = tokenizer("\n\n".join(([question] if question else []) + docs), add_special_tokens=False)["input_ids"]
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs]
    bounds, pos = [], 0
    for n, r in zip(lengths, rates):
        bounds.append((pos, pos + n, r))
        pos += n
    windows, lo = [], 0
    while lo < pos:  # window w covers plan tokens [lo, hi)
        hi = min(pos, size - 1 if not windows else lo + size)
        windows.append([(max(a, lo), min(b, hi), r) for a, b, r in bounds if a < hi and b > lo])
        lo = hi
    def scores(upto: int | None, old: list[float] | None, ready: int) -> list[float]:
        with_q = _nll(model, ids[:upto]).tolist()
        if not question:
            fresh = with_q
        else:  # position j >= start: loss without the question minus with it
            without = _nll(model, ids[start:upto]).tolist()
            fresh = [0.0] * start + [without[j - start] - with_q[j] for j in range(start, len(with_q))]
        if old is None:
            return fresh
        old = old + [0.0] * max(0, len(fresh) - len(old))
        old[ready:len(fresh)] = fresh[ready:]
        return old

    loss = scores(None, None, 0)
    end, ready = min(size + start, len(ids)), 0
    for w, pieces in enumerate(windows):
        if end > len(ids):
            break
        if w:
            loss = scores(end, loss, ready)
        ready = end - size if not (start and w == 0) else 0
        for a, b, r in pieces:
            n = b - a
            stop = end - size + n
            ranked = loss[start:]
            if r >= 1:
                theta = -float("inf")
            else:
                k = max(0, min(len(ranked) - 1, int(len(ranked) * r) - 1))
                theta = sorted(ranked, reverse=True)[k]
            keep = [j < max(stop - n, start) or j >= stop or j == len(ids) - 1 or loss[j] > theta
                    for j in range(len(ids))]
            removed = sum(1 for j in range(stop) if not keep[j])
            ids = [t for t, k in zip(ids, keep) if k]
            loss = [v for v, k in zip(loss, keep[:len(loss)]) if k]
            end = stop - removed + size
    return ids[start:]


@pytest.mark.parametrize("lengths,size,rate", [([150], 40, 0.5), ([60, 45, 70], 32, 0.4), ([90, 30], 25, 0.7)])
def test_token_level_compression_equals_the_definition(lm, lengths, size, rate):
    model, tokenizer = lm
    docs = [_doc(i, n) for i, n in enumerate(lengths)]
    out = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, rate=rate, iterative_size=size,
                                     use_context_filter=False)
    total = sum(len(d.split()) for d in docs)
    target = rate * total
    tau = target / (sum(n + 2 for n in lengths) + 1)
    expected = reference(model, tokenizer, docs, [tau] * len(docs), size)
    assert out["compressed_prompt"] == tokenizer.decode(expected)
    assert out["compressed_tokens"] < out["origin_tokens"]


def test_rate_one_keeps_everything_and_bad_options_are_refused(lm):
    model, tokenizer = lm
    docs = [_doc(5, 80)]
    out = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, rate=1.0, iterative_size=30)
    assert out["compressed_prompt"] == docs[0] and out["rate"] == 1.0
    with pytest.raises(ScheduleError, match="rate"):
        graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, rate=0.0)
    with pytest.raises(ScheduleError, match="context_budget"):
        graphprune.compress_prompt([_doc(1, 10), _doc(2, 10)], compressor=model, tokenizer=tokenizer,
                                   context_budget="**2")


def test_context_filter_ranks_and_keeps_until_the_budget_is_spent(lm):
    """LLMLingua keeps the most surprising contexts (highest mean loss) until target + 100 is spent, the one that
    overflows included; LongLLMLingua ranks by the question's loss after each document (lowest first) and ``sort``
    puts the best first."""
    model, tokenizer = lm
    docs = [_doc(10 + i, 30) for i in range(8)]
    question = "w1 w2 w3 ?"
    mean = [float(_nll(model, tokenizer(d)["input_ids"]).mean()) for d in docs]
    out = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, rate=0.1, iterative_size=20,
                                     context_budget="+0")
    ranked = sorted(range(8), key=lambda i: -mean[i])
    target = 0.1 * 8 * 30
    expected = ranked[:int(target // 30) + 1]
    assert out["kept_contexts"] == sorted(expected)
    qloss = []
    for d in docs:
        ids = tokenizer(d + question + " We can get the answer to this question in the given documents.")["input_ids"]
        qloss.append(float(_nll(model, ids)[29:].mean()))
    out = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, question=question, rate=0.1,
                                     iterative_size=20, context_budget="+0", method="longllmlingua", reorder="sort")
    assert out["kept_contexts"] == sorted(range(8), key=lambda i: qloss[i])[:len(out["kept_contexts"])]
    assert out["compressed_prompt"].endswith(question)


def test_longllmlingua_contrastive_scores_equal_the_definition(lm):
    """condition_compare: the question goes first and stays; each token is scored by how much more surprising its
    successor is without the question than with it; the question is dropped from the compressed context and appended
    after it."""
    model, tokenizer = lm
    docs = [_doc(20, 70), _doc(21, 50)]
    question = "w7 w8 w9 ?"
    out = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, question=question, rate=0.5,
                                     iterative_size=30, method="longllmlingua", condition_compare=True,
                                     use_context_filter=False)
    target = 0.5 * (4 + 120) - 4
    tau = target / (72 + 52 + 1)
    expected = reference(model, tokenizer, docs, [tau, tau], 30, question=question)
    assert out["compressed_prompt"] == tokenizer.decode(expected) + "\n\n" + question
    plain = graphprune.compress_prompt(docs, compressor=model, tokenizer=tokenizer, question=question, rate=0.5,
                                       iterative_size=30, method="longllmlingua", use_context_filter=False)
    assert plain["compressed_prompt"] != out["compressed_prompt"]


def test_optimize_returns_a_model_whose_generate_compresses_the_prompt(lm):
    """recipe="llmlingua": generate decodes each prompt, compresses it (the compressor defaults to the model itself),
    generates from the compressed prompts and returns the original prompt ids followed by the new tokens; rate 1.0 is
    the model; the user's model is untouched."""
    model, tokenizer = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    docs = [_doc(30, 90), _doc(31, 70)]
    tokenizer.padding_side = "left"
    enc = tokenizer(docs, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    fast = graphprune.optimize(model, "llmlingua", rate=0.5, tokenizer=tokenizer, iterative_size=30)
    out = fast.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert torch.equal(out[:, :enc["input_ids"].shape[1]], enc["input_ids"])
    for i, doc in enumerate(docs):
        short = graphprune.compress_prompt(doc, compressor=model, tokenizer=tokenizer, rate=0.5, iterative_size=30)
        assert fast.last[i]["compressed_prompt"] == short["compressed_prompt"]
        ids = tokenizer(short["compressed_prompt"], return_tensors="pt")["input_ids"]
        assert torch.equal(out[i, -5:], model.generate(ids, **kw)[0, -5:])
        assert ids.shape[1] < len(doc.split()) * 0.75
    same = graphprune.optimize(model, "llmlingua", rate=1.0, tokenizer=tokenizer)
    assert torch.equal(same.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw),
                       model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(graphprune.errors.RecipeError, match="tokenizer"):
        graphprune.optimize(model, "llmlingua")
    assert fast.recipe.options()["tokenizer"] == type(tokenizer).__name__  # (reports name objects, not dump them)
