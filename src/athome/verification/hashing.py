"""Canonical hashes of tensors: what a commitment binds a trainer to.

A digest covers each tensor's dtype, shape and raw bytes (little-endian as stored), in order, so two peers hash the
same tensors to the same hex string and any change of a value, dtype, shape or order changes it. SHA-256 (full 256
bits, so that even a trainer preparing a colliding pair of bundles in advance faces 2^128 work): it is the fastest
hash in hashlib where CPUs have SHA instructions (1.5 GB/s here vs 0.5 for blake2b) and it releases the GIL.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

HEX_DIGEST_LENGTH = 64


def update_with_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed one tensor (dtype, shape, bytes) into ``digest``."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    digest.update(f"{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def hash_tensors(tensors: Iterable[torch.Tensor], person: bytes = b"athome-tensors") -> str:
    """Hex SHA-256 digest of ``tensors`` in order, domain-separated by ``person`` (see the module docstring)."""
    digest = hashlib.sha256(len(person).to_bytes(2, "big") + person)
    count = 0
    for tensor in tensors:
        update_with_tensor(digest, tensor)
        count += 1
    digest.update(count.to_bytes(8, "big"))
    return digest.hexdigest()
