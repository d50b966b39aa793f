"""The sample pipeline: per-stream rings, aligned sliding windows, vectorised features, sensor alarms."""

from gateway.pipeline.features import (
    basic_features,
    basic_features_batch,
    hrv_features,
    missing_fraction,
)
from gateway.pipeline.ring import RingBuffer
from gateway.pipeline.windows import Windower

__all__ = [
    "RingBuffer",
    "Windower",
    "basic_features",
    "basic_features_batch",
    "hrv_features",
    "missing_fraction",
]
