"""Serving an exported model on Ray Serve (slow: Ray starts in about half a minute): results equal a local ONNX Runtime
run, dynamic batching across replicas, bad requests answered clearly while serving goes on, clean shutdown. The
replicas' runtime (requests checked, batched by shape, run) is tested without Ray in the default run."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

import graphprune
from graphprune.errors import GraphPruneError
from graphprune.serving import BadRequest, Runtime, model_file, parse_body
from tests.conftest import HF

slow = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str):
    req = urllib.request.Request(url, data=body, headers={"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """A tiny BERT with ToMe exported as one ONNX graph for 2 to 32 tokens (ids and mask), and the local runner."""
    folder = tmp_path_factory.mktemp("text")
    ids = torch.randint(2, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    local = graphprune.optimize(HF["bert"](), "tome", r=3, example_inputs=(ids, torch.ones_like(ids)), lengths=[16, 32],
                                target="onnx", output=folder)
    return folder, local


def _tokens(n: int, seed: int) -> dict:
    ids = np.random.default_rng(seed).integers(2, 100, n)
    return {"input_ids": ids, "attention_mask": np.ones(n, np.int64)}


def test_a_text_encoder_runtime_batches_requests_of_one_length_together(text_encoder):
    """Requests of a text encoder (ids and mask by name) of several lengths in one dynamic batch: each answer equals
    the request run alone; bad requests are refused with what the model takes."""
    folder, local = text_encoder
    runtime = Runtime(model_file(folder))
    assert [p.name for p in runtime.inputs] == ["input_ids", "attention_mask"]
    requests = [_tokens(n, seed) for seed, n in enumerate((5, 9, 5, 32, 9))]
    answers = runtime([runtime.check(r) for r in requests])
    for request, answer in zip(requests, answers):
        alone = local(*(torch.from_numpy(request[k])[None] for k in ("input_ids", "attention_mask")))
        assert answer.shape == (len(request["input_ids"]), 48)
        np.testing.assert_allclose(answer, alone.last_hidden_state[0].numpy(), atol=1e-5)
    ids = requests[0]["input_ids"]
    for bad, message in [
        (ids, "send them by name, {input_ids, attention_mask}"),
        ({"input_ids": ids}, "missing attention_mask"),
        ({**requests[0], "token_type_ids": ids * 0}, "not inputs of the model: token_type_ids"),
        ({"input_ids": ids + 0.5, "attention_mask": ids * 0 + 1}, "input_ids: the request must be whole numbers"),
        ({"input_ids": ids[None], "attention_mask": ids[None]}, "leave out the batch axis"),
    ]:
        with pytest.raises(BadRequest, match=message.replace("{", "\\{")):
            runtime.check(bad)
    unequal = runtime.check({"input_ids": ids, "attention_mask": np.ones(7, np.int64)})  # the runtime refuses it:
    good = runtime.check(requests[1])  # that request's answer says so, the others in the batch are answered
    refused, answered = runtime([unequal, good])
    assert isinstance(refused, BadRequest) and "could not run this request" in str(refused)
    np.testing.assert_allclose(answered, answers[1], atol=1e-6)


def test_an_npz_body_carries_one_array_per_input():
    body = io.BytesIO()
    np.savez(body, input_ids=np.arange(4), attention_mask=np.ones(4))
    parsed = parse_body(body.getvalue(), "application/octet-stream")
    assert sorted(parsed) == ["attention_mask", "input_ids"] and parsed["input_ids"].tolist() == [0, 1, 2, 3]
    with pytest.raises(BadRequest, match="not a .npy array"):
        parse_body(b"PK\x03\x04broken", "application/octet-stream")


@slow
def test_a_text_encoder_is_served_at_every_length(text_encoder):
    """A text encoder on Ray Serve: concurrent requests of several lengths (ids and mask by name) over the handle and
    over HTTP (JSON and .npz), each equal to the request run alone; bad ones answered with 400. (Before the image
    model's fixture starts Ray for its own tests.)"""
    ray = pytest.importorskip("ray")
    folder, local = text_encoder
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = graphprune.serve(folder, max_batch_size=4, num_cpus=0.5, port=port)
        requests = [_tokens(n, seed) for seed, n in enumerate((3, 17, 3, 32, 17, 8))]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda r: handle.remote(r).result(), requests))
        for request, answer in zip(requests, answers):
            alone = local(*(torch.from_numpy(request[k])[None] for k in ("input_ids", "attention_mask")))
            np.testing.assert_allclose(answer, alone.last_hidden_state[0].numpy(), atol=1e-5)
        url, body = f"http://127.0.0.1:{port}/", io.BytesIO()
        np.savez(body, **requests[1])
        for payload, kind in [(json.dumps({"inputs": {k: v.tolist() for k, v in requests[1].items()}}).encode(),
                               "application/json"), (body.getvalue(), "application/octet-stream")]:
            status, answer = _post(url, payload, kind)
            assert status == 200
            np.testing.assert_allclose(answer["outputs"], answers[1], atol=1e-5)
        for inputs, message in [({"input_ids": [5, 6]}, "missing attention_mask"),
                                ({"input_ids": [5, 6], "attention_mask": [1, 1, 1]}, "could not run this request")]:
            status, answer = _post(url, json.dumps({"inputs": inputs}).encode(), "application/json")
            assert status == 400 and message in answer["error"], answer
    finally:
        graphprune.serving.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ray = pytest.importorskip("ray")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False).eval()
    folder = tmp_path_factory.mktemp("served")
    local = graphprune.optimize(vit, "tome", r=2, example_inputs=(torch.randn(2, 3, 32, 32),), target="onnx",
                                output=folder)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = graphprune.serve(folder, replicas=2, max_batch_size=4, num_cpus=0.5, port=port)
        yield local, handle, f"http://127.0.0.1:{port}/"
    finally:
        graphprune.serving.shutdown()
    assert not ray.is_initialized()  # nothing left running


@slow
def test_handle_requests_are_batched_and_equal_a_local_run(served):
    local, handle, _ = served
    xs = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    with ThreadPoolExecutor(12) as pool:  # concurrent requests: dynamic batching stacks them
        outs = list(pool.map(lambda x: handle.remote(x).result(), xs))
    expected = local(torch.from_numpy(xs)).last_hidden_state  # (the ONNX runner gives the model's output type)
    np.testing.assert_allclose(np.stack(outs), expected.numpy(), atol=1e-5)


@slow
def test_bad_requests_get_a_clear_error_and_serving_goes_on(served):
    _, handle, url = served
    with pytest.raises(Exception, match="leave out the batch axis"):
        handle.remote(np.zeros((1, 3, 32, 32), np.float32)).result()
    bad = np.zeros((3, 32, 32), np.float32)
    bad[0, 0, 0] = np.nan
    for body, kind, message in [
        (json.dumps({"inputs": np.zeros((3, 16, 16)).tolist()}).encode(), "application/json", "shape 3×32×32"),
        (json.dumps({"inputs": bad.tolist()}).encode(), "application/json", "NaN"),
        (b"\x00garbage", "text/plain", "neither JSON"),
        (json.dumps({"inputs": "pixels"}).encode(), "application/json", "numbers"),
    ]:
        status, answer = _post(url, body, kind)
        assert status == 400 and message in answer["error"], answer
    x = np.random.default_rng(1).standard_normal((3, 32, 32)).astype(np.float32)
    status, answer = _post(url, json.dumps({"inputs": x.tolist()}).encode(), "application/json")
    npy = io.BytesIO()
    np.save(npy, x)
    status2, answer2 = _post(url, npy.getvalue(), "application/octet-stream")
    assert status == status2 == 200
    np.testing.assert_allclose(answer["outputs"], handle.remote(x).result(), atol=1e-5)
    np.testing.assert_allclose(answer2["outputs"], answer["outputs"], atol=1e-6)


@slow
def test_serve_refuses_what_is_not_an_exported_model(tmp_path):
    with pytest.raises(GraphPruneError, match="not an exported model"):
        graphprune.serve(tmp_path)
