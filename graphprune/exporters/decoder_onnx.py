"""Decoder LLMs to ONNX: a prefill graph and a static-shape decode-step graph, run by ONNX Runtime.

With a fixed budget the cache has a fixed number of slots per layer, so both graphs have
static cache shapes: prefill (``input_ids``, ``attention_mask`` → last logits, cache) and one
decode step (``input_ids``, ``position_ids``, cache → last logits, cache), where the cache is
each layer's keys, values, slot validity, slot positions and the recipe's scores. Recipes that
compress only the prompt (SnapKV, PyramidKV) get ``max_new_tokens`` extra slots for the
tokens generated. Batch is dynamic; the prompt length is the one exported.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from graphprune.errors import ExportError, GraphPruneError, first_line
from graphprune.exporters.files import publish, staging_dir
from graphprune.exporters.onnx import OPSET, _quiet_loggers, _session
from graphprune.kv.model import cache_argument, positions
from graphprune.kv.policy import When

TOLERANCE = 1e-4


class Prefill(torch.nn.Module):
    def __init__(self, lm, extra: int):
        super().__init__()
        self.lm, self.extra = lm, extra

    def forward(self, input_ids, attention_mask):
        cache = self.lm.graphprune.new_cache(static=self.extra)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=True, logits_to_keep=1, **{cache_argument(self.lm): cache})
        return (out.logits[:, -1], *cache.flat())


class DecodeStep(torch.nn.Module):
    def __init__(self, lm, capacities: list[int], extra: int, rows_plan: tuple[int, ...] | None = None):
        super().__init__()
        self.lm, self.capacities, self.extra, self.rows_plan = lm, capacities, extra, rows_plan

    def forward(self, input_ids, position_ids, *state):
        cache = self.lm.graphprune.new_cache(self.extra, self.rows_plan).load_flat(state, self.capacities)
        out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{cache_argument(self.lm): cache})
        return (out.logits[:, -1], *cache.flat())


def _export(module, args, names_in, names_out, path: Path, dynamic) -> None:
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), _quiet_loggers("torch.onnx", "onnx_ir"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names_in, output_names=names_out,
                                        dynamic_shapes=dynamic, opset_version=OPSET, verbose=False)
            program.save(str(path), external_data=True)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"ONNX export of the decoder's {path.stem} graph failed: {first_line(err)}") from err


def publish_checked(got: torch.Tensor, expected: torch.Tensor, staged: Path, output: Path) -> None:
    """Publish the staged files when ONNX Runtime's greedy tokens ``got`` equal eager generation's ``expected``."""
    if not torch.equal(got, expected):
        raise ExportError(f"ONNX Runtime generation differs from eager generation ({got.tolist()} vs "
                          f"{expected.tolist()}); nothing was written")
    publish(sorted(staged.iterdir()), output)


class OnnxDecoder:
    """A decoder exported by :func:`export_decoder_onnx`: greedy generation in ONNX Runtime."""

    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        self.meta = json.loads((folder / "decoder.json").read_text())
        self.prefill = _session(folder / "prefill.onnx", threads)
        self.decode = _session(folder / "decode.onnx", threads)
        self.report = None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16):
        """Greedy generation; returns the new tokens (B, max_new_tokens)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[1] != self.meta["prompt_len"]:
            raise GraphPruneError(f"this export takes prompts of {self.meta['prompt_len']} tokens (left-pad shorter "
                                  f"ones), got {input_ids.shape[1]}")
        if max_new_tokens > self.meta["max_new_tokens"] and self.meta["extra_slots"]:
            raise GraphPruneError(f"this {self.meta['recipe']} export has room for {self.meta['max_new_tokens']} new "
                                  "tokens; export again with a larger max_new_tokens")
        logits, *state = self.prefill.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return self._decode(logits, state, attention_mask.sum(-1, keepdim=True).numpy().astype(np.int64), max_new_tokens)

    def _decode(self, logits, state, pos, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding steps after the prompt pass (its last ``logits`` and the cache ``state``); ``pos`` (B, 1):
        the first new token's position."""
        names = self.meta["state_names"]
        eos, pad = self.meta.get("eos_token_ids") or [], self.meta.get("pad_token_id") or 0
        done = np.zeros((pos.shape[0], 1), dtype=bool)
        tokens = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)[:, None].astype(np.int64)
            nxt = np.where(done, pad, nxt)  # a finished sequence is padded, as generate() does
            done |= np.isin(nxt, eos)
            tokens.append(nxt)
            if step == max_new_tokens - 1:
                break
            feed = {"input_ids": nxt, "position_ids": pos + step, **{f"past.{n}": t for n, t in zip(names, state)}}
            logits, *state = self.decode.run(None, feed)
        return torch.from_numpy(np.concatenate(tokens, axis=1))


def export_decoder_onnx(lm, output, prompt_len: int = 64, max_new_tokens: int = 32, batch: int = 2,
                        check_tokens: int = 8) -> OnnxDecoder:
    """Export the evicting decoder ``lm`` (from ``graphprune.optimize``) to ``output``/{prefill,decode}.onnx.

    Checked before anything is written: greedy generation in ONNX Runtime matches eager
    generation token for token on a random left-padded batch.
    """
    recipe = lm.graphprune.policy
    if not recipe.exportable:
        raise GraphPruneError(f"'{recipe.name}' has no static-shape decode step to export to ONNX yet (its cache "
                              "changes size as it works); use target='eager'")
    if isinstance(recipe.budget, float):
        raise GraphPruneError("ONNX export needs a fixed budget: give budget as an int (cached tokens per layer)")
    extra = 0 if recipe.evicts is When.STEP else max_new_tokens
    output = Path(output)
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, : prompt_len // 4] = 0  # left padding in the example batch
    prefill = Prefill(lm, extra).eval()
    with torch.no_grad():
        logits, *state = prefill(ids, mask)
    cache = lm.graphprune.new_cache()
    names = cache.state_names()
    capacities = [state[i * (len(names) // len(cache.layers))].shape[2] - extra for i in range(len(cache.layers))]
    decode = DecodeStep(lm, capacities, extra).eval()
    b = torch.export.Dim("batch", min=1, max=1024)
    with staging_dir(output) as tmp:
        past, present = [f"past.{n}" for n in names], [f"present.{n}" for n in names]
        _export(prefill, (ids, mask), ["input_ids", "attention_mask"], ["logits", *present], tmp / "prefill.onnx",
                {"input_ids": {0: b}, "attention_mask": {0: b}})
        step_in = (ids[:, -1:], positions(mask)[:, -1:] + 1, *state)
        _export(decode, step_in, ["input_ids", "position_ids", *past], ["logits", *present], tmp / "decode.onnx",
                {"input_ids": {0: b}, "position_ids": {0: b}, "state": tuple({0: b} for _ in state)})
        eos = lm.generation_config.eos_token_id
        meta = {"recipe": recipe.name, "options": recipe.options(), "prompt_len": prompt_len,
                "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
                "pad_token_id": lm.generation_config.pad_token_id if lm.generation_config.pad_token_id is not None else 0,
                "max_new_tokens": max_new_tokens, "extra_slots": extra, "capacities": capacities, "state_names": names}
        (tmp / "decoder.json").write_text(json.dumps(meta, indent=2))
        runner = OnnxDecoder(tmp)
        with torch.no_grad():
            expected = lm.generate(ids, attention_mask=mask, max_new_tokens=check_tokens, do_sample=False,
                                   pad_token_id=meta["pad_token_id"])[:, prompt_len:]
        got = runner.generate(ids, mask, check_tokens)[:, :expected.shape[1]]  # generate() stops when all are done
        publish_checked(got, expected, tmp, output)
    runner = OnnxDecoder(output)
    runner.report = lm.report
    return runner
