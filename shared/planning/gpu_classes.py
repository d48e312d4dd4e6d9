"""GPU classes: the kinds of devices trainers run on, with their memory, speed and price.

Operators describe them in a YAML file named by TUNERY_GPU_CLASSES; without one, the only class
is `cpu`. Each class has its own train queue (`train:<name>`); estimates and costs use these
figures, and measured throughput (shared.planning.calibration) refines the speed once jobs have run.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class GpuClassError(Exception):
    pass


class GpuClass(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    memory_gb: float = Field(gt=0, description="usable memory per device")
    price_per_hour_usd: float = Field(ge=0, description="per device")
    devices_per_node: int = Field(default=1, ge=1)
    # Dense bf16 peak per device (fp32 for cpu) and the share of it training achieves before any
    # job has been measured on this class.
    peak_tflops: float = Field(gt=0)
    assumed_mfu: float = Field(default=0.35, gt=0, le=1)


# Two cores of a small x86 server: about 0.1 TFLOP/s fp32 of which small-model training reaches
# a fraction; priced like a small cloud VM. Calibration replaces the speed after the first job.
DEFAULT_CLASSES = {
    "cpu": GpuClass(name="cpu", memory_gb=16, price_per_hour_usd=0.10, peak_tflops=0.1, assumed_mfu=0.2),
}


def load_gpu_classes(path: Path | None) -> dict[str, GpuClass]:
    if path is None:
        return dict(DEFAULT_CLASSES)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GpuClassError(f"cannot read TUNERY_GPU_CLASSES {path}: {exc}") from exc
    classes = data.get("gpu_classes")
    if not isinstance(classes, dict) or not classes:
        raise GpuClassError(f"{path}: expected a non-empty mapping under 'gpu_classes'")
    loaded = {}
    for name, spec in classes.items():
        try:
            loaded[str(name)] = GpuClass(name=str(name), **(spec or {}))
        except (TypeError, ValidationError) as exc:
            raise GpuClassError(f"{path}: gpu class {name!r}: {exc}") from exc
    return loaded
