"""Container health check for every Tunery image: exit 0 when the service answers HTTP, 1 otherwise.

The service is the one PID 1 runs (`tunery api`, `tunery trainer`, `tunery evaluator` or
`tunery inference`), so one script serves both images; a first argument (api, trainer, evaluator,
inference) overrides the guess. The API answers /healthz on TUNERY_API_PORT; workers answer
/metrics on their metrics port. Only the standard library is used, and nothing is written to disk
(the root filesystem may be read-only).
"""

from __future__ import annotations

import os
import sys
import urllib.request

TARGETS = {
    "api": ("TUNERY_API_PORT", "8000", "/healthz"),
    "trainer": ("TUNERY_TRAINER_METRICS_PORT", "9101", "/metrics"),
    "evaluator": ("TUNERY_EVALUATOR_METRICS_PORT", "9102", "/metrics"),
    "inference": ("TUNERY_INFERENCE_METRICS_PORT", "9103", "/metrics"),
}


def service_of_pid1() -> str:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "api"
    for word in reversed(words):
        if word in TARGETS:
            return word
    return "api"


def main() -> int:
    service = sys.argv[1] if len(sys.argv) > 1 else service_of_pid1()
    variable, default, path = TARGETS[service]
    url = f"http://127.0.0.1:{os.environ.get(variable, default)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{service} unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
