"""P5: file uploads through Tunery's API against direct boto3 put_object to the same S3 server.

A moto S3 server (`python -m moto.server`) backs both. The peer is one boto3 `put_object` of the same bytes:
the cost of storing alone. Tunery's side is POST /v1/files (multipart form) to a real `tunery api` (uvicorn,
one process, storage in that bucket) of a valid chat JSONL of long rows (about 8 KB each), larger than
TUNERY_SYNC_VALIDATION_BYTES (8 MiB), so that it is validated after the answer. Two untimed uploads of each
side come first; 7 repeats by default, since one upload's time varies by a third. Rows:

- P5: until POST /v1/files answers: the body received and parsed as it arrives, the file hashed, written to
  a local copy and sent to S3 meanwhile (one streamed PUT: httpx sends the file as the form's last part),
  its record saved (status `uploaded`); what boto3 gives the peer, the object stored and its name known.
- P5-processed: until GET /v1/files/{id} (polled every 0.1 s) says `processed`: the above, then validation
  in a worker process. No goal: it is shown beside the peer's figure for context only.
- P5-RSS: one larger file (1 GiB by default) through the API until processed, and the API process's peak
  RSS (VmHWM) above its RSS before.

    .venv/bin/python bench/p5_uploads.py [--repeats 7] [--megabytes 50] [--large-megabytes 1024]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import boto3
import common  # noqa: F401 - puts the repository on sys.path
import httpx
from botocore.config import Config
from common import emit, service_env, start_process, start_redis
from upload_concurrency import KEY, wait_processed

from tests.helpers import free_port, stop_process

BUCKET = "bench"
MB = 1024 * 1024


def chat_file(size: int) -> bytes:
    """Valid chat JSONL of `size` bytes or a little less, in rows of about 8 KB."""
    words = " ".join(f"word{i}" for i in range(1200))
    row = json.dumps(
        {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": words}]}
    )
    row_bytes = (row + "\n").encode()
    return row_bytes * (size // len(row_bytes))


def memory_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--large-megabytes", type=int, default=1024, help="the RSS goal is for 1 GiB")
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.large_megabytes = 10, 50
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_process, redis_url = start_redis(Path(tmp))
            processes.append(redis_process)
            s3_url = f"http://127.0.0.1:{free_port()}"
            moto_args = [
                sys.executable,
                "-m",
                "moto.server",
                "-p",
                s3_url.rsplit(":", 1)[1],
                "-H",
                "127.0.0.1",
            ]
            processes.append(
                start_process(moto_args, {}, Path(tmp) / "moto.log", lambda: httpx.get(s3_url, timeout=2).is_success,
                              "moto server")
            )  # fmt: skip
            config = Config(
                request_checksum_calculation="when_required", response_checksum_validation="when_required"
            )
            s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench", config=config)  # fmt: skip
            s3.create_bucket(Bucket=BUCKET)
            extra = {
                "TUNERY_API_PORT": str(api_port := free_port()), "TUNERY_S3_BUCKET": BUCKET,
                "TUNERY_S3_ENDPOINT_URL": s3_url, "TUNERY_S3_ACCESS_KEY_ID": "bench",
                "TUNERY_S3_SECRET_ACCESS_KEY": "bench",
            }  # fmt: skip
            api_url = f"http://127.0.0.1:{api_port}"
            api = start_process([sys.executable, "-m", "cli", "api"], service_env(Path(tmp), redis_url, KEY, extra),
                                Path(tmp) / "api.log",
                                lambda: httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200, "tunery api")  # fmt: skip
            processes.append(api)
            http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)

            def tunery(body: bytes) -> tuple[float, float]:
                """Seconds until the answer (the file stored, its id known), and until it is processed."""
                started = time.perf_counter()
                # From a file object, as a client uploading a file from disk sends it: httpx reads it 64 KiB at
                # a time. Given bytes, httpx hands the socket the whole body, and re-slices what is left after
                # each partial send: quadratic, 6 s of the client's CPU for 300 MB.
                response = http.post(
                    "/v1/files",
                    files={"file": ("big.jsonl", io.BytesIO(body))},
                    data={"purpose": "fine-tune"},
                )
                answered = time.perf_counter() - started
                file = wait_processed(http, response.raise_for_status().json())
                processed = time.perf_counter() - started
                assert file["status"] == "processed", file
                http.delete(f"/v1/files/{file['id']}").raise_for_status()
                return answered, processed

            def peer(body: bytes) -> float:
                started = time.perf_counter()
                s3.put_object(Bucket=BUCKET, Key="peer/big.jsonl", Body=body)
                return time.perf_counter() - started

            body = chat_file(args.megabytes * MB)
            # Two untimed uploads each first: the API's first upload starts its validation processes, both
            # clients open their connections, and moto's first large objects are slower (0.4 s against 0.2 s
            # to store 50 MB, for the peer's too).
            for _ in range(2):
                tunery(body)
                peer(body)
            results: dict[str, list[float]] = {"tunery": [], "processed": [], "peer": []}
            for repeat in range(args.repeats):
                for side in ("tunery", "peer")[:: 1 if repeat % 2 == 0 else -1]:
                    if side == "peer":
                        results["peer"].append(len(body) / MB / peer(body))
                    else:
                        answered, processed = tunery(body)
                        results["tunery"].append(len(body) / MB / answered)
                        results["processed"].append(len(body) / MB / processed)
                    print(f"P5 repeat {repeat + 1} {side}: {results[side][-1]:.1f} MB/s", flush=True)
                print(
                    f"P5 repeat {repeat + 1} until processed: {results['processed'][-1]:.1f} MB/s", flush=True
                )
            large = chat_file(args.large_megabytes * MB)
            rss_before = memory_kb(api.pid, "VmRSS")
            large_answered, large_seconds = tunery(large)
            rss_growth_mb = (memory_kb(api.pid, "VmHWM") - rss_before) / 1024
            print(
                f"P5 {len(large) / MB:.0f} MB through the API: answered in {large_answered:.1f} s, processed in "
                f"{large_seconds:.1f} s, peak RSS +{rss_growth_mb:.0f} MB"
            )
            http.close()
        finally:
            for process in reversed(processes):
                stop_process(process, timeout=20)
    emit(
        [
            {
                "id": "P5", "benchmark": f"upload of a {len(body) / MB:.0f} MB chat JSONL", "unit": "MB/s",
                "tunery": results["tunery"], "peer": results["peer"],
                "peer_name": "boto3 put_object of the same bytes to the same moto server",
                "setup": "POST /v1/files until its answer: the file received, hashed and stored in S3, its id known "
                "(status uploaded: larger than TUNERY_SYNC_VALIDATION_BYTES, it is validated after); moto S3 server",
            },
            {
                "id": "P5-processed", "benchmark": f"upload of a {len(body) / MB:.0f} MB chat JSONL, until processed",
                "unit": "MB/s", "tunery": results["processed"], "peer": results["peer"],
                "peer_name": "boto3 put_object of the same bytes (storing alone, no validation), for context",
                "setup": "POST /v1/files, then GET /v1/files/{id} every 0.1 s until status processed: received, "
                "stored, and validated in a worker process (JSON of every row, statistics, personal data)",
            },
            {
                "id": "P5-RSS", "benchmark": f"API peak RSS growth, one {len(large) / MB:.0f} MB upload",
                "unit": "MB", "lower_is_better": True, "tunery": [rss_growth_mb], "peer": [],
                "peer_name": "(none)", "setup": f"VmHWM after minus VmRSS before, until processed; answered in {large_answered:.1f} s, "
                f"processed in {large_seconds:.1f} s",
            },
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
