"""P4: job-status GETs/s of Tunery's API against a bare Starlette app reading the same job record.

Both are served by uvicorn, one process each, on the same redis-server: Tunery's `tunery api` answers
GET /v1/fine_tuning/jobs/{id} (API-key check, tenant check, the record rendered in OpenAI's shape); the
peer (`app` below) checks the bearer token against one string, GETs the record's key and returns its
JSON as stored. Throughput: 64 concurrent closed-loop httpx clients (asyncio, one process) for a fixed
window. Latency: an open-loop window at a fixed offered rate, the same for both (`--rate`), each request
timed from when it was due, so a slow answer delays nobody's clock (no coordinated omission); p99 of that.

    .venv/bin/python bench/p4_api.py [--repeats 3] [--seconds 8] [--clients 64] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
import httpx
import redis.asyncio
from common import REPO, emit, service_env, start_process, start_redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from upload_concurrency import KEY, load

from tests.helpers import free_port, stop_process

_redis = redis.asyncio.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


async def job(request: Request) -> Response:
    """The bare peer: the stored record of `tunery:job:<id>`, as stored."""
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    raw = await _redis.get(f"tunery:job:{request.path_params['job_id']}")
    if raw is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    return Response(raw, media_type="application/json")


app = Starlette(routes=[Route("/v1/fine_tuning/jobs/{job_id}", job)])


async def open_loop(base_url: str, path: str, rate: float, seconds: float) -> tuple[float, int]:
    """p99 latency (ms) and failures of GETs of `path` sent at `rate` per second for `seconds`, whatever the
    answers: each is timed from the moment it was due."""
    latencies: list[float] = []
    failures = 0
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as http:

        async def one(due: float) -> None:
            nonlocal failures
            response = await http.get(path)
            latencies.append(time.perf_counter() - due)
            failures += response.status_code != 200

        await asyncio.gather(*(http.get(path) for _ in range(8)))  # open a few connections first
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    latencies.sort()
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0, help="offered requests/s of the latency window")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3.0
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_process, redis_url = start_redis(Path(tmp))
            processes.append(redis_process)
            env = service_env(Path(tmp), redis_url, KEY, {"TUNERY_API_PORT": str(api_port := free_port())})
            tunery_url = f"http://127.0.0.1:{api_port}"
            processes.append(
                start_process([sys.executable, "-m", "cli", "api"], env, Path(tmp) / "api.log",
                              lambda: httpx.get(f"{tunery_url}/readyz", timeout=2).status_code == 200, "tunery api")
            )  # fmt: skip
            peer_port = free_port()
            peer_url = f"http://127.0.0.1:{peer_port}"
            peer_args = [sys.executable, "-m", "uvicorn", "p4_api:app", "--app-dir", str(REPO / "bench"),
                         "--port", str(peer_port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
            processes.append(
                start_process(peer_args, {**env, "BENCH_REDIS_URL": redis_url}, Path(tmp) / "peer.log",
                              lambda: httpx.get(f"{peer_url}/v1/fine_tuning/jobs/x", timeout=2).status_code == 401,
                              "bare starlette")
            )  # fmt: skip
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=tunery_url, headers=headers, timeout=60) as http:
                data = (REPO / "examples/data/identity_chat.jsonl").read_bytes()
                file = http.post("/v1/files", files={"file": ("identity_chat.jsonl", data)},
                                 data={"purpose": "fine-tune"}).raise_for_status().json()  # fmt: skip
                body = {"model": "tunery/tiny-chat", "training_file": file["id"]}
                job_id = http.post("/v1/fine_tuning/jobs", json=body).raise_for_status().json()["id"]
            path = f"/v1/fine_tuning/jobs/{job_id}"
            results: dict[str, list[tuple[float, float, int]]] = {"tunery": [], "peer": []}
            latency: dict[str, list[tuple[float, int]]] = {"tunery": [], "peer": []}
            for repeat in range(args.repeats):
                sides = (("tunery", tunery_url), ("peer", peer_url))
                for side, url in sides[:: 1 if repeat % 2 == 0 else -1]:
                    results[side].append(figures := asyncio.run(load(url, path, args.clients, args.seconds)))
                    latency[side].append(tail := asyncio.run(open_loop(url, path, args.rate, args.seconds)))
                    print(f"P4 repeat {repeat + 1} {side}: {figures[0]:.0f} req/s ({args.clients} clients, "
                          f"p99 {figures[1]:.0f} ms); p99 {tail[0]:.0f} ms at {args.rate:.0f} req/s offered; "
                          f"{figures[2] + tail[1]} failures", flush=True)  # fmt: skip
        finally:
            for process in reversed(processes):
                stop_process(process, timeout=20)
    setup = f"{args.clients} concurrent httpx clients, {args.seconds:.0f} s windows, uvicorn one process each"
    open_setup = (
        f"open loop: {args.rate:.0f} requests/s offered for {args.seconds:.0f} s, each timed from when it was "
        "due; uvicorn one process each"
    )
    emit(
        [
            {
                "id": "P4", "benchmark": "job-status GETs", "unit": "requests/s",
                "tunery": [r[0] for r in results["tunery"]], "peer": [r[0] for r in results["peer"]],
                "peer_name": "bare Starlette app, redis.asyncio GET of the same record", "setup": setup,
                "extra": {"failures": {s: [r[2] for r in v] for s, v in results.items()}},
            },
            {
                "id": "P4-p99", "benchmark": "job-status GET p99 latency, open loop", "unit": "ms", "lower_is_better": True,
                "tunery": [r[0] for r in latency["tunery"]], "peer": [r[0] for r in latency["peer"]],
                "peer_name": "the same bare Starlette app", "setup": open_setup,
                "extra": {
                    "closed_loop_p99_ms": {s: [r[1] for r in v] for s, v in results.items()},
                    "failures": {s: [r[1] for r in v] for s, v in latency.items()},
                },
            },
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
