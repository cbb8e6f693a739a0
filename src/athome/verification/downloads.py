"""Robust state downloads: a trainer that falls behind takes the swarm's state from several peers, not from one.

hivemind's ``load_state_from_peers`` copies the whole state (parameters, optimizer statistics, epoch) of the first
peer that answers, the one advertising the highest priority: a single malicious trainer that advertises a high
epoch hands its parameters to every peer that catches up (observed: an honest trainer one epoch behind copied a
x1000 attacker's parameters whole). :func:`combine_states` is the rule that
:class:`athome.averaging.RobustTrainingStateAverager` applies to the states it downloaded:

* a state that does not fit (another number of tensors, a shape or dtype that differs from this peer's own, a
  non-finite value, no integer epoch) is rejected by :func:`state_problem` before anything is combined;
* 3 or more sources (at most ``max_sources``): their coordinate-wise median (with 3, one arbitrary source cannot
  move any coordinate outside the range of the two others);
* 2 sources: if they agree (distance within ``bound`` times the larger norm), the one closer to this peer's own
  parameters; if they disagree, the one within ``bound`` of the own parameters when exactly one is, else none;
* 1 source: accepted only if its parameters are within ``bound`` of the own ones (relative to their norm), unless
  this peer has no state of its own yet (epoch 0: its parameters are an initialisation, not progress), in which
  case it is accepted with a warning that it trusts one peer.

Distances are measured on the parameters (and hivemind's extra tensors), not on optimizer statistics, which
legitimately differ between a restarted peer and the swarm. Not guaranteed: with two colluding sources among
three, or one source and a fresh start, the result is theirs; the epoch and priority peers advertise are their own
claims (admission and bans limit who can advertise).

A new expert host copying an expert from its live replicas (``athome.peer.join``) applies the same rule through
:func:`replica_state` (the names, shapes, dtypes and finiteness of each replica's weights) and
:func:`combine_replica_states` (always a fresh start: its own weights are the uid's deterministic init, so two
replicas that disagree are both refused and one replica is trusted with a warning).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from athome.numerics import all_finite

logger = logging.getLogger(__name__)

DEFAULT_MAX_SOURCES = 3
DEFAULT_BOUND = 0.5  # relative L2 distance between parameter vectors; an honest lag of a few epochs stays well below


class StateRejected(ValueError):
    """A downloaded state (or the combination of several) must not be applied; the current state is kept."""


@dataclass
class DownloadedState:
    """One peer's answer to ``rpc_download_state``: hivemind's metadata dict and its flat list of tensors."""

    source: str
    metadata: Any
    tensors: List[torch.Tensor]

    @property
    def epoch(self) -> int:
        return self.metadata["epoch"]


def state_problem(own: Sequence[torch.Tensor], state: DownloadedState) -> Optional[str]:
    """Why ``state`` cannot replace a state shaped like ``own`` (None if it can)."""
    if not isinstance(state.metadata, dict):
        return f"metadata is {type(state.metadata).__name__}, not a dict"
    epoch = state.metadata.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"epoch {epoch!r} is not a non-negative integer"
    if "optimizer_metadata" not in state.metadata:
        return "no optimizer_metadata"
    return tensors_problem(own, state.tensors)


def tensors_problem(own: Sequence[torch.Tensor], tensors: Sequence[Any], names: Optional[Sequence[str]] = None
                    ) -> Optional[str]:
    """Why ``tensors`` cannot replace ``own`` (None if they can): count, type, shape, dtype, finite values.

    :param names: what to call each tensor in the answer (default: its index)
    """
    if len(tensors) != len(own):
        return f"{len(tensors)} tensors, expected {len(own)}"
    for index, (mine, theirs) in enumerate(zip(own, tensors)):
        name = f"tensor {index}" if names is None else f"tensor {names[index]!r}"
        if not isinstance(theirs, torch.Tensor):
            return f"{name} is a {type(theirs).__name__}, not a tensor"
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            return f"{name} is {theirs.dtype} {tuple(theirs.shape)}, expected {mine.dtype} {tuple(mine.shape)}"
        if not all_finite(theirs):
            return f"{name} has non-finite values"
    return None


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    floats = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t.is_floating_point()]
    return torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float64)


def relative_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """``||a - b|| / ||reference||`` over the floating-point tensors (inf if the reference is zero and a != b)."""
    difference = float(torch.linalg.vector_norm(_flat(a) - _flat(b)))
    scale = float(torch.linalg.vector_norm(_flat(reference)))
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale


def combine_states(
    own: Sequence[torch.Tensor],
    states: Sequence[DownloadedState],
    *,
    num_parameters: int,
    fresh: bool,
    bound: float = DEFAULT_BOUND,
    max_sources: int = DEFAULT_MAX_SOURCES,
) -> Tuple[Any, List[torch.Tensor], str]:
    """Combine downloaded states (already checked with :func:`state_problem`) by the rule in the module docstring.

    :param own: this peer's current state tensors (parameters and extras first, then optimizer statistics)
    :param num_parameters: how many leading tensors are parameters/extras (the ones distances are measured on)
    :param fresh: this peer has no state of its own yet (a lone source is then trusted, with a warning)
    :returns: (metadata, tensors, how) where ``how`` says which rule produced them, for the log; after a median,
        the metadata (epoch, optimizer metadata) of the source with the median epoch
    :raises StateRejected: no state may be applied (the reason says why); the caller keeps its current state
    """
    used, tensors, how = combine_tensors(own, states, num_parameters=num_parameters, fresh=fresh, bound=bound,
                                         max_sources=max_sources)
    middle = sorted(used, key=lambda s: s.epoch)[(len(used) - 1) // 2]
    return dict(middle.metadata), tensors, how


def combine_tensors(
    own: Sequence[torch.Tensor],
    states: Sequence[DownloadedState],
    *,
    num_parameters: int,
    fresh: bool,
    bound: float = DEFAULT_BOUND,
    max_sources: int = DEFAULT_MAX_SOURCES,
) -> Tuple[List[DownloadedState], List[torch.Tensor], str]:
    """The rule of the module docstring on the tensors alone (metadata is not read; see :func:`combine_states`).

    :returns: (the sources the tensors came from: all those in a median, else the one chosen; tensors; how)
    :raises StateRejected: no state may be applied (the reason says why)
    """
    if not states:
        raise StateRejected("no peer served a usable state")
    own_params = own[:num_parameters]

    def from_own(state: DownloadedState) -> float:
        return relative_distance(state.tensors[:num_parameters], own_params, own_params)

    if len(states) >= 3:
        chosen = list(states[:max(3, max_sources)])
        # torch.median takes the lower middle for an even count: still inside the honest range with a majority
        tensors = [torch.stack([s.tensors[i] for s in chosen]).median(dim=0).values for i in range(len(own))]
        return chosen, tensors, f"coordinate-wise median of {', '.join(s.source for s in chosen)}"

    if len(states) == 2:
        first, second = states
        scale = max(1e-30, max(float(torch.linalg.vector_norm(_flat(s.tensors[:num_parameters]))) for s in states))
        difference = _flat(first.tensors[:num_parameters]) - _flat(second.tensors[:num_parameters])
        apart = float(torch.linalg.vector_norm(difference)) / scale
        if apart <= bound:
            if fresh:
                best = first
            else:
                best = min(states, key=from_own)
            return [best], list(best.tensors), f"{best.source} (2 sources agree within {apart:.3g})"
        if fresh:
            raise StateRejected(f"the 2 sources {first.source} and {second.source} disagree (relative distance "
                                f"{apart:.3g} > {bound:g}) and this peer has no state of its own to tell which is "
                                f"right")
        near = [s for s in states if from_own(s) <= bound]
        if len(near) != 1:
            raise StateRejected(f"the 2 sources {first.source} and {second.source} disagree (relative distance "
                                f"{apart:.3g} > {bound:g}) and {len(near)} of them are within {bound:g} of this "
                                f"peer's own parameters")
        return [near[0]], list(near[0].tensors), f"{near[0].source} (2 sources disagree; the one near ours)"

    (only,) = states
    if fresh:
        logger.warning(f"Loading the whole state from ONE peer ({only.source}) without any check against other "
                       f"peers: this peer has no state of its own yet and no other peer served one")
        return [only], list(only.tensors), f"{only.source} (single source, fresh start: trusted)"
    distance = from_own(only)
    if distance > bound:
        raise StateRejected(f"the only source {only.source} is {distance:.3g} (relative) away from this peer's own "
                            f"parameters, more than {bound:g}; with no second source to confirm it, it is refused")
    return [only], list(only.tensors), f"{only.source} (single source within {distance:.3g} of ours)"


def replica_state(own: Mapping[str, torch.Tensor], source: str, served: Any) -> DownloadedState:
    """An expert's weights as one replica served them (name -> tensor), ordered like ``own``.

    :raises StateRejected: they cannot replace ``own`` (other names, a shape or dtype that differs, NaN/Inf)
    """
    if not isinstance(served, Mapping) or set(served) != set(own):
        names = sorted(served) if isinstance(served, Mapping) else type(served).__name__
        raise StateRejected(f"served tensors {names}, expected {sorted(own)}")
    names = list(own)
    tensors = [served[name] for name in names]
    problem = tensors_problem([own[name] for name in names], tensors, names)
    if problem is not None:
        raise StateRejected(problem)
    return DownloadedState(source, None, tensors)


def combine_replica_states(
    own: Mapping[str, torch.Tensor], states: Sequence[DownloadedState], *, bound: float = DEFAULT_BOUND,
    max_sources: int = DEFAULT_MAX_SOURCES,
) -> Tuple[Dict[str, torch.Tensor], str]:
    """Combine an expert's weights from its replicas (each from :func:`replica_state`) for a new host.

    The host is always on a fresh start (``own`` is the uid's deterministic init, not progress): 3 replicas give
    their median, 2 that agree give the first, 2 that disagree are both refused, 1 is trusted with a warning.

    :returns: (name -> tensor, how) for ``load_state_dict``
    :raises StateRejected: no combination may be applied; the host keeps its own weights
    """
    _, tensors, how = combine_tensors(list(own.values()), states, num_parameters=len(own), fresh=True, bound=bound,
                                      max_sources=max_sources)
    return dict(zip(own, tensors)), how
