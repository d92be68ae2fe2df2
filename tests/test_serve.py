"""Serving an exported model on Ray Serve (slow: Ray starts in about half a minute): results equal a local ONNX Runtime
run, dynamic batching across replicas, bad requests answered clearly while serving goes on, clean shutdown."""

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

pytestmark = pytest.mark.slow


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


def test_handle_requests_are_batched_and_equal_a_local_run(served):
    local, handle, _ = served
    xs = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    with ThreadPoolExecutor(12) as pool:  # concurrent requests: dynamic batching stacks them
        outs = list(pool.map(lambda x: handle.remote(x).result(), xs))
    expected = local(torch.from_numpy(xs)).last_hidden_state  # (the ONNX runner gives the model's output type)
    np.testing.assert_allclose(np.stack(outs), expected.numpy(), atol=1e-5)


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


def test_serve_refuses_what_is_not_an_exported_model(tmp_path):
    with pytest.raises(GraphPruneError, match="not an exported model"):
        graphprune.serve(tmp_path)
