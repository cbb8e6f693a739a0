"""Canonical hashes of tensors: what a commitment binds a trainer to.

A digest covers each tensor's dtype, shape and raw bytes (little-endian as stored), in order, so two peers hash the
same tensors to the same hex string and any change of a value, dtype, shape or order changes it. blake2b releases
the GIL on large buffers, so hashing in a background thread does not stall training.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

DIGEST_SIZE = 16  # 128-bit digests: 32 hex characters in records


def update_with_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed one tensor (dtype, shape, bytes) into ``digest``."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    digest.update(f"{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def hash_tensors(tensors: Iterable[torch.Tensor], person: bytes = b"athome-tensors") -> str:
    """Hex blake2b digest of ``tensors`` in order (see the module docstring)."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE, person=person[:16])
    count = 0
    for tensor in tensors:
        update_with_tensor(digest, tensor)
        count += 1
    digest.update(count.to_bytes(8, "big"))
    return digest.hexdigest()
