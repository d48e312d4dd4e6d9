"""How much a large upload slows other clients: requests/s and p99 latency of cheap GETs, quiet and during
a 50 MB upload, on a real `tunery api` (uvicorn, one worker) and a real redis-server.

    .venv/bin/python bench/upload_concurrency.py [--seconds 20] [--clients 16] [--megabytes 50]

Each scenario runs `--clients` concurrent clients doing GET /v1/files/{id} for `--seconds`; during the
upload scenarios one more client uploads the file again and again (so the whole window is under load):
blank lines or a repeated valid chat row, through POST /v1/files or the Uploads API (create, parts,
complete). It also prints how long one upload took. Exits 1 when a loaded scenario falls below 0.8x the
quiet throughput or its p99 reaches 100 ms (the goal of issue 13).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import free_port, stop_process, wait_for  # noqa: E402

KEY = "sk-bench-upload-concurrency"
CHAT_ROW = json.dumps(
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
).encode()
PART_BYTES = 16 * 1024 * 1024


def blank_lines(size: int) -> bytes:
    """Blank lines, then the ten examples a file needs at least."""
    rows = (CHAT_ROW + b"\n") * 10
    return b"\n" * (size - len(rows)) + rows


def chat_rows(size: int) -> bytes:
    row = CHAT_ROW + b"\n"
    return row * (size // len(row))


def post_file(http: httpx.Client, body: bytes) -> dict:
    response = http.post("/v1/files", files={"file": ("big.jsonl", body)}, data={"purpose": "fine-tune"})
    response.raise_for_status()
    return response.json()


def post_upload(http: httpx.Client, body: bytes) -> dict:
    create = {"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(body), "mime_type": "text/jsonl"}
    upload_id = http.post("/v1/uploads", json=create).raise_for_status().json()["id"]
    parts = [
        http.post(f"/v1/uploads/{upload_id}/parts", files={"data": body[i : i + PART_BYTES]})
        .raise_for_status()
        .json()["id"]
        for i in range(0, len(body), PART_BYTES)
    ]
    done = http.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": parts}).raise_for_status()
    return done.json()["file"]


def wait_processed(http: httpx.Client, file: dict) -> dict:
    """The file once validated: at once, or (asynchronous validation) when its status leaves `uploaded`."""
    while file["status"] not in ("processed", "error"):
        time.sleep(0.1)
        file = http.get(f"/v1/files/{file['id']}").raise_for_status().json()
    return file


async def load(base_url: str, path: str, clients: int, seconds: float) -> tuple[float, float, int]:
    """Requests/s, p99 latency (ms) and failures of `clients` concurrent GETs of `path` for `seconds`."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:

        async def one_client() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.get(path)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, p99 * 1000, failures


def upload_loop(base_url: str, send: Callable[[httpx.Client], dict], stop: Event, results: Queue) -> None:
    """Upload until `stop`, in its own process (its GIL is not the load generator's); each upload's seconds
    go to `results`, then None, or the error that stopped it."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=300) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                file = wait_processed(http, send(http))
            except Exception as error:  # the parent reports it
                results.put(repr(error))
                return
            if file["status"] != "processed":
                results.put(f"upload ended {file['status']}: {file['status_details']}")
                return
            results.put(time.perf_counter() - started)
            http.delete(f"/v1/files/{file['id']}")
    results.put(None)


def scenario(
    base_url: str, path: str, args: argparse.Namespace, send: Callable[[httpx.Client], dict] | None
) -> dict:
    """Load figures, with `send` uploading in a loop in another process for the whole window."""
    context = multiprocessing.get_context("fork")
    stop, results = context.Event(), context.Queue()
    uploader = context.Process(target=upload_loop, args=(base_url, send, stop, results)) if send else None
    if uploader:
        uploader.start()
        time.sleep(0.5)  # the upload's body is on its way before the window opens
    rps, p99, failures = asyncio.run(load(base_url, path, args.clients, args.seconds))
    uploads: list[float] = []
    if uploader:
        stop.set()
        while (item := results.get()) is not None:
            if isinstance(item, str):
                raise RuntimeError(item)
            uploads.append(item)
        uploader.join()
    return {"rps": rps, "p99_ms": p99, "failures": failures, "uploads": uploads}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    args = parser.parse_args()
    size = args.megabytes * 1024 * 1024

    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        api_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
        env |= {
            "TUNERY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "TUNERY_DATA_DIR": str(Path(tmp) / "data"),
            "TUNERY_API_PORT": str(api_port),
            "TUNERY_BOOTSTRAP_API_KEY": KEY,
            "TUNERY_RATE_LIMIT_PER_MINUTE": "0",
            "TUNERY_LOG_LEVEL": "WARNING",
        }
        log = open(Path(tmp) / "api.log", "wb")  # noqa: SIM115 - the child owns it
        api = subprocess.Popen(
            [sys.executable, "-m", "cli", "api"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        base_url = f"http://127.0.0.1:{api_port}"
        try:
            wait_for(lambda: httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200, timeout=60,
                     what="tunery api", process=api)  # fmt: skip
            with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
                small = post_file(http, chat_rows(4096))
            path = f"/v1/files/{small['id']}"
            scenarios: dict[str, Callable[[httpx.Client], dict] | None] = {
                "quiet": None,
                "files, blank lines": lambda http: post_file(http, blank_lines(size)),
                "files, chat rows": lambda http: post_file(http, chat_rows(size)),
                "uploads, chat rows": lambda http: post_upload(http, chat_rows(size)),
            }
            results = {}
            for name, send in scenarios.items():
                if args.only and name not in args.only and name != "quiet":
                    continue
                results[name] = figures = scenario(base_url, path, args, send)
                each = ", ".join(f"{s:.1f}" for s in figures["uploads"]) or "-"
                print(
                    f"{name:20} {figures['rps']:8.0f} req/s  p99 {figures['p99_ms']:7.1f} ms  "
                    f"failures {figures['failures']}  upload(s) of {args.megabytes} MB took {each} s",
                    flush=True,
                )
        finally:
            stop_process(api, timeout=30)
            stop_process(redis, timeout=10)
            log.close()
    quiet = results["quiet"]["rps"]
    slow = [n for n, f in results.items() if f["rps"] < 0.8 * quiet or f["p99_ms"] >= 100 or f["failures"]]
    if slow:
        print(f"below 0.8x the quiet throughput, p99 >= 100 ms, or failures: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
