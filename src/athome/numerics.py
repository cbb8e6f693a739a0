"""NaN/Inf checks, cheap on every device and dtype: every tensor a peer receives or computes goes through one.

``torch.isfinite(t).all()`` writes a boolean per element and costs ~3-4 ns an element on a CPU (measured on 2 cores,
8.4M elements: fp32 38 ms, fp16 27 ms, bf16 24 ms), as much as a small expert's whole backward. A reduction that
propagates NaN and Inf reads the tensor once instead: ``torch.aminmax`` (fp32 1.7 ms, fp16 1.0-1.5 ms, bf16
1.0 ms), or, for fp32/fp64 on a CPU, numpy's dot product (8.4M: 2.7 ms; a 262144-value averaging part: 35 us
against aminmax's 90 us).
"""
from __future__ import annotations

import numpy as np
import torch


def finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``tensor``'s device: True if no element is NaN or Inf. Stack several and read them
    once to pay one device synchronisation for all."""
    tensor = tensor.detach()
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    # min and max propagate NaN, and an Inf is the min or the max: both finite iff every element is
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no element of ``tensor`` is NaN or Inf."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) and tensor.numel():
        # a finite sum of squares implies finite elements; only when it is not (NaN, Inf, or elements beyond ~1e19
        # whose squares overflow) are they checked again. numpy: torch's multi-threaded reductions were ~5x slower
        # on a loaded 2-core box (measured: 550 vs 90 us for 131072 values)
        array = tensor.numpy().reshape(-1)
        with np.errstate(all="ignore"):  # overflow / NaN here are expected, not warnings
            return bool(np.isfinite(np.dot(array, array))) or bool(finite_flag(tensor))
    return bool(finite_flag(tensor))
