"""Choosing the compute device and precision, with every automatic choice logged beside its flag."""
from __future__ import annotations

import logging

import torch

from athome.lifecycle import die

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info(f"Using device {device.type} (override with --device)")
        return device
    if requested == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but torch sees no CUDA GPU; check `nvidia-smi`, or use --device cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"  # bf16/fp16 autocast on CPU is ~3x slower than fp32 for these shapes
    logger.info(f"Using precision {precision} on {device.type} (override with --precision)")
    return precision
