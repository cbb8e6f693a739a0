"""Canonical hashes of tensors: what a commitment binds a trainer to.

A digest covers each tensor's dtype, shape and raw bytes (little-endian as stored), in order, so two peers hash the
same tensors to the same hex string and any change of a value, dtype, shape or order changes it. SHA-256 (full 256
bits, so that even a trainer preparing a colliding pair of bundles in advance faces 2^128 work): it is the fastest
hash in hashlib where CPUs have SHA instructions (1.5 GB/s here vs 0.5 for blake2b) and it releases the GIL.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch

HEX_DIGEST_LENGTH = 64


def update_with_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed one tensor (dtype, shape, bytes) into ``digest``."""
    _update(digest, [tensor])


def _update(digest, tensors: Sequence[torch.Tensor]) -> None:
    # one header for all tensors, then their bytes concatenated: the same digest as feeding them one by one would
    # need a header each; per-tensor Python overhead dominated hashing small tensors (~35 us each)
    cpu = [t.detach().cpu() if t.device.type != "cpu" else t.detach() for t in tensors]
    digest.update("".join(f"{str(t.dtype)}|{tuple(t.shape)}|" for t in cpu).encode())
    views = [t.contiguous().reshape(-1).view(torch.uint8) for t in cpu if t.numel()]
    if len(views) == 1:
        digest.update(memoryview(views[0].numpy()))
    elif views:
        digest.update(memoryview(torch.cat(views).numpy()))


def hash_tensors(tensors: Iterable[torch.Tensor], person: bytes = b"athome-tensors") -> str:
    """Hex SHA-256 digest of ``tensors`` in order, domain-separated by ``person`` (see the module docstring).

    Covers the list of (dtype, shape) then all bytes in order: any change of a value, dtype, shape or order, or
    moving bytes between tensors (the shapes are covered), changes the digest.
    """
    tensors = list(tensors)
    digest = hashlib.sha256(len(person).to_bytes(2, "big") + person)
    digest.update(len(tensors).to_bytes(8, "big"))
    _update(digest, tensors)
    return digest.hexdigest()
