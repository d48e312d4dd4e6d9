"""Measured training speed per GPU class, so duration estimates improve with every finished job.

Stored as achieved FLOP/s per device (model-independent), smoothed over recent jobs.
"""

from __future__ import annotations

from redis import Redis

CALIBRATION_KEY = "tunery:calibration:flops"
# Weight of the newest measurement: recent jobs matter most, one odd job does not swing it.
SMOOTHING = 0.5


def calibrated_flops(redis: Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in redis.hgetall(CALIBRATION_KEY).items()}


def record_throughput(redis: Redis, gpu_class: str, flops: float, seconds: float) -> None:
    if seconds <= 0 or flops <= 0:
        return
    measured = flops / seconds
    previous = redis.hget(CALIBRATION_KEY, gpu_class)
    value = measured if previous is None else SMOOTHING * measured + (1 - SMOOTHING) * float(previous)
    redis.hset(CALIBRATION_KEY, gpu_class, value)
