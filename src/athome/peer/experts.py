"""Which experts a volunteer hosts: hivemind's pattern grammar, and ``auto`` (least-replicated first, like Petals).

Patterns: ``ffn.0.[0:8]`` (a range, end exclusive), ``ffn.1.3`` (one uid), comma-separated lists of either
(``ffn.0.3,ffn.1.[0:4]``), or ``auto``.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from typing import Iterable, Mapping, Optional, Tuple

from athome.config import ModelConfig
from athome.model.expert import expert_parameter_count

logger = logging.getLogger(__name__)
_RANGE = re.compile(r"\[(\d+):(\d+)\]")


class ExpertPatternError(ValueError):
    """An --experts pattern that names nothing valid in this run's grid."""


def expand_pattern(pattern: str, model: ModelConfig) -> list[str]:
    """All uids a pattern names, validated against the run's expert grid, in grid order without duplicates."""
    grid = model.expert_uids()
    valid = set(grid)
    chosen: set[str] = set()
    for part in filter(None, (piece.strip() for piece in _split_top_level(pattern))):
        for uid in _expand_ranges(part):
            if uid not in valid:
                raise ExpertPatternError(
                    f"--experts {pattern!r} names {uid!r}, which is not in this run's grid "
                    f"({grid[0]} .. {grid[-1]}); use e.g. '{model.expert_prefix}.0.[0:{model.experts_per_layer}]' or 'auto'"
                )
            chosen.add(uid)
    if not chosen:
        raise ExpertPatternError(f"--experts {pattern!r} names no expert; use e.g. 'auto'")
    return [uid for uid in grid if uid in chosen]


def _split_top_level(pattern: str) -> list[str]:
    """Split on commas that are not inside [...] (so 'ffn.0.[0:4]' stays whole)."""
    parts, depth, current = [], 0, []
    for char in pattern:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _expand_ranges(part: str) -> Iterable[str]:
    match = _RANGE.search(part)
    if match is None:
        yield part
        return
    start, end = int(match.group(1)), int(match.group(2))
    if end <= start:
        raise ExpertPatternError(f"empty range [{start}:{end}] in {part!r}: the end is exclusive")
    for index in range(start, end):
        yield from _expand_ranges(part[: match.start()] + str(index) + part[match.end() :])


def choose_least_replicated(
    model: ModelConfig, replicas: Mapping[str, int], count: int, peer_id: str, banned: Iterable[str] = ()
) -> list[str]:
    """Pick ``count`` uids with the fewest live replicas.

    Ties break by a hash of (peer ID, uid), so volunteers joining at once spread over the grid instead of all
    picking the same experts.
    """
    banned = set(banned)
    candidates = [uid for uid in model.expert_uids() if uid not in banned]

    def rank(uid: str) -> tuple[int, bytes]:
        return replicas.get(uid, 0), hashlib.blake2b(f"{peer_id}/{uid}".encode(), digest_size=8).digest()

    return sorted(sorted(candidates, key=rank)[:count], key=candidates.index)


def count_replicas(servers: Mapping[str, Iterable[str]], exclude_peer: Optional[str] = None) -> Counter:
    """uid -> number of hosts declaring it, given host peer ID -> its uids."""
    counts: Counter = Counter()
    for peer_id, uids in servers.items():
        if peer_id != exclude_peer:
            counts.update(set(uids))
    return counts


# cuBLAS keeps a workspace per thread that runs matmuls (forward and backward: ~64 MiB measured on an H100, by the
# first expert of a process, whatever its size), plus the caching allocator's rounding
CUDA_RESERVED_BYTES = 128 * 2**20


def expert_memory_bytes(model: ModelConfig, precision: str, offload: bool, accumulation: int = 1) -> int:
    """Device bytes one expert keeps between requests: its weights (the fp16/bf16 working copy with ``offload``),
    AdamW's two fp32 moments unless offloaded, and fp32 gradients while they accumulate over ``accumulation > 1``
    calls. Measured on an H100 (tests/test_cuda.py): 12 bytes per parameter in fp32, 2 with fp16 + offload."""
    params = expert_parameter_count(model)
    if offload:
        return params * (2 if precision in ("fp16", "bf16") else 4)
    return params * (4 + 8 + (4 if accumulation > 1 else 0))


def request_memory_bytes(model: ModelConfig, max_batch_size: int) -> int:
    """Device bytes of the request in flight: a host computes one request at a time, whatever its number of
    experts, so this is needed once: activations and their gradients, and one expert's parameter gradients."""
    params = expert_parameter_count(model)
    activations = max_batch_size * (model.d_model * 2 + model.expert_hidden * 2) * 4
    return 2 * activations + 4 * params


def experts_that_fit(model: ModelConfig, precision: str, offload: bool, accumulation: int, budget_bytes: int,
                     max_batch_size: int, device_type: str) -> Tuple[int, int, int]:
    """(how many experts fit ``budget_bytes``, at least 1; bytes per expert; bytes of working space set aside)."""
    per_expert = expert_memory_bytes(model, precision, offload, accumulation)
    working = request_memory_bytes(model, max_batch_size) + (CUDA_RESERVED_BYTES if device_type == "cuda" else 0)
    return max(1, (budget_bytes - working) // per_expert), per_expert, working
