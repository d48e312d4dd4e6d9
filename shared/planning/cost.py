"""What a job costs: device-seconds × the class's hourly price. Every device a job holds counts."""

from __future__ import annotations

from shared.planning.gpu_classes import GpuClass


def cost_usd(gpu_class: GpuClass, device_seconds: float) -> float:
    return device_seconds * gpu_class.price_per_hour_usd / 3600
