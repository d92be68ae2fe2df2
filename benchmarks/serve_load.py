"""Load test of models served on Ray Serve: the unmodified model and ToMe, exported to ONNX and served the same way
(HTTP, JSON bodies), 1,000 requests at concurrency 32; throughput, p50/p99 latency, lost and wrong responses (each
answer against a local ONNX Runtime run of the same sample); then a run during which one replica is killed (Ray Serve
starts a new one): the failed requests are counted and requests after the restart must succeed.

    python benchmarks/serve_load.py --requests 1000 --concurrency 32     # docs/serving.md

Model: a ViT-Ti/16-shaped random ViT at 224 px (12 blocks, width 192, 197 tokens); ToMe r=8. Needs the serve extra
(``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from llm import _commit  # (the commit the run imported, once)

OUT = Path(__file__).parent.parent / "docs"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, x: np.ndarray):
    body = json.dumps({"inputs": x.tolist()}).encode()
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = np.asarray(json.loads(r.read())["outputs"], dtype=np.float32)
        return time.perf_counter() - t0, out, None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        return time.perf_counter() - t0, None, str(err)


def _median_ms(work, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        t0 = time.perf_counter()
        work()
        spent.append(time.perf_counter() - t0)
    return 1000 * sorted(spent)[times // 2]


def _json_cost(x: np.ndarray) -> dict:
    """What one request's JSON body costs: its size, the client's writing and a replica's parsing into an array."""
    body = json.dumps({"inputs": x.tolist()}).encode()
    return {"body_mb": len(body) / 1e6, "write_ms": _median_ms(lambda: json.dumps({"inputs": x.tolist()})),
            "parse_ms": _median_ms(lambda: np.asarray(json.loads(body)["inputs"], dtype=np.float32))}


def _load(url: str, xs: np.ndarray, expected: np.ndarray, concurrency: int, during=None) -> dict:
    """Send every sample of ``xs`` (concurrently), check each answer; ``during()`` runs once a third of them is done."""
    done = [0]
    lock = threading.Lock()
    fired = threading.Event()

    def one(i):
        latency, out, error = _post(url, xs[i])
        with lock:
            done[0] += 1
            if during is not None and done[0] >= len(xs) // 3 and not fired.is_set():
                fired.set()
                threading.Thread(target=during).start()
        wrong = out is not None and not np.allclose(out, expected[i], atol=1e-4)
        return latency, error, wrong, time.perf_counter()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(xs))))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results if r[1] is None)
    failed = [r for r in results if r[1] is not None]
    last_failure = max((r[3] for r in failed), default=None)
    after = [r for r in results if last_failure is not None and r[3] > last_failure]
    return {"requests": len(xs), "ok": len(latencies), "failed": len(failed),
            "wrong": sum(r[2] for r in results), "throughput_rps": len(latencies) / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
            "succeeded_after_last_failure": sum(r[1] is None for r in after),
            "errors": sorted({r[1][:120] for r in failed})[:3]}


def _kill_one_replica() -> None:
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    if replicas:
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        print(f"killed {replicas[0]['name']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    commit = _commit()  # (read as the run starts: the code it runs)

    import ray
    from transformers import ViTConfig, ViTModel

    import graphprune

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                             image_size=224, patch_size=16), add_pooling_layer=False).eval()
    example = (torch.randn(2, 3, 224, 224),)
    xs = np.random.default_rng(0).standard_normal((args.requests, 3, 224, 224)).astype(np.float32)
    rows, model_ms, cost = [], {}, _json_cost(xs[0])
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for label, options in (("unmodified", {"r": 0}), ("tome r=8", {"r": 8})):
                folder = Path(tmp) / label.replace(" ", "_").replace("=", "")
                local = graphprune.optimize(vit, "tome", example_inputs=example, target="onnx", output=folder, **options)
                expected = np.concatenate([local(torch.from_numpy(xs[i:i + 32])).last_hidden_state.numpy()
                                           for i in range(0, len(xs), 32)])
                one = torch.from_numpy(xs[:1])
                model_ms[label] = _median_ms(lambda: local(one))  # (one sample, here, outside Ray)
                port = _port()
                graphprune.serve(folder, replicas=args.replicas, max_batch_size=args.max_batch_size,
                                 num_cpus=2 / args.replicas / 2, port=port)
                url = f"http://127.0.0.1:{port}/"
                _post(url, xs[0])  # (warm-up)
                print(f"{label}: load", flush=True)
                rows.append({"model": label, "run": "load", **_load(url, xs, expected, args.concurrency)})
                print(rows[-1], flush=True)
                if label != "unmodified":
                    print(f"{label}: a replica killed a third of the way", flush=True)
                    rows.append({"model": label, "run": "replica killed",
                                 **_load(url, xs, expected, args.concurrency, during=_kill_one_replica)})
                    print(rows[-1], flush=True)
                from ray import serve

                serve.shutdown()
        finally:
            graphprune.serving.shutdown()
    payload = {"date": datetime.date.today().isoformat(), "commit": commit,
               "command": "python benchmarks/serve_load.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in vars(args).items()),
               "json": cost, "model_ms": model_ms, "rows": rows}
    (OUT / "serving").mkdir(parents=True, exist_ok=True)
    (OUT / "serving" / "load.json").write_text(json.dumps(payload, indent=2))
    lines = ["# Serving on Ray Serve: load test", "",
             f"`{payload['command']}` ({payload['date']}, commit {commit}). A ViT-Ti/16-shaped random ViT at 224 px "
             "exported to ONNX (unmodified, i.e. ToMe r=0, and ToMe r=8), served by `graphprune.serve` on Ray started "
             f"with 2 CPUs ({args.replicas} replicas, dynamic batches of up to {args.max_batch_size}), requests over "
             "HTTP with JSON bodies from a thread pool on the same 2-core machine (the client's JSON work competes with "
             "the replicas). Wrong: an answer further than 1e-4 from a local ONNX Runtime run of the same sample.", "",
             "| model | run | requests | ok | failed | wrong | throughput (req/s) | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['run']} | {r['requests']} | {r['ok']} | {r['failed']} | {r['wrong']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    killed = [r for r in rows if r["run"] == "replica killed"]
    if killed:
        lines += ["", f"With a replica killed a third of the way: {killed[0]['failed']} requests failed "
                      f"({'; '.join(killed[0]['errors']) or 'none'}), and all {killed[0]['succeeded_after_last_failure']} "
                      "requests after the last failure succeeded (Ray Serve started a new replica)."]
    models = ", ".join(f"{label} {ms:.0f} ms" for label, ms in model_ms.items())
    lines += ["", f"One request's JSON body is {cost['body_mb']:.1f} MB: {cost['write_ms']:.0f} ms for the client to "
                  f"write and {cost['parse_ms']:.0f} ms for a replica to parse into an array, against the model's own "
                  f"time for one sample ({models}; ONNX Runtime in this process, outside Ray, median of 5). Where the "
                  "JSON costs more than the model, it bounds the throughput and the reduced model's speedup does not "
                  "show in these rows; they test correctness under load: every answer checked, none lost but those "
                  "in flight on the killed replica."]
    (OUT / "serving.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'serving.md'}")


if __name__ == "__main__":
    main()
