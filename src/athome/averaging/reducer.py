"""Robust aggregation of tensor parts inside hivemind's butterfly all-reduce.

In a butterfly all-reduce every group member *reduces* one slice of the vector: each sender streams its copy of
that slice to the reducer, part by part, and gets the aggregate back. hivemind's ``TensorPartReducer`` aggregates
with a running weighted sum whose weights are whatever the senders claim, and checks nothing. This module's
:class:`RobustTensorPartReducer` keeps hivemind's protocol (same methods, same futures, same sender bookkeeping) and
changes only how one part is aggregated and what is accepted:

* ``method="centered_clip"`` (default) aggregates with CenteredClip (Karimireddy, He, Jaggi, ICML 2021)::

      v <- v + sum_i w_i (x_i - v) min(1, tau / ||x_i - v||) / sum_i w_i        (``iterations`` times)

  - *Start point*: the weighted mean of the central parts, those whose median distance to the other parts is at
    most the median of these spreads (with 2 senders: both). A "previous aggregate" does not exist here: a Moshpit
    group, its members and the slice a reducer owns change every round. While fewer than half the senders are
    Byzantine, every honest part's spread is at most the honest parts' diameter D, so an attacker's part is central
    only if it lies within about D of honest parts: the iterations start next to the honest mean instead of having
    to walk back from an attacker-dragged mean (each iteration moves at most ~tau). Unlike a coordinate-wise
    median, this point lies in the span of the parts, so it costs no pass over the data (the iterations run on the
    parts' Gram matrix, see :func:`_centered_clip`; measured, 4 x 262144 values: 0.5 ms per part instead of 2.4 ms
    from a coordinate median).
  - *tau is relative*: ``tau = clip_tau * median_i ||x_i - v||`` recomputed at each iteration. This makes the
    reducer scale-free (the same setting works for gradients and for parameters) and, because the median distance is
    an honest one while attackers are a minority, each attacker's pull on the result is bounded by about
    ``tau * w_attacker / sum(w_honest)`` per part, i.e. a fraction of the honest peers' typical spread however
    large the attack (measured: 0.37x the honest spread with 3 honest peers, 1 attacker, clip_tau=1). Honest senders
    within ``tau`` of the aggregate are not clipped at all, so with no attacker the result equals the weighted mean
    whenever ``clip_tau >= max_i ||x_i - mean|| / median_i ||x_i - mean||`` (for 2 senders: always).
  - *Weights*: claimed weights are capped at ``max_weight_ratio * median(positive claimed weights)``, so claiming a
    weight of 1e6 buys no more than an ordinary peer's share.
* ``method="mean"`` is hivemind's weighted mean (weights as claimed), plus the input checks below.

Both methods reject a part that is not finite (NaN/Inf), a non-finite or negative weight, or a part of the wrong
shape: this reducer treats the sender as *failed* for the rest of the round (exactly like a sender that timed out:
it is excluded from this and later parts and gets no results back, so the sender's own round is incomplete; other
reducers, which saw finite parts, still use them). NaN never reaches an aggregate. Weight and shape are checked when
a part arrives, finiteness when the part is reduced: for CenteredClip that is free (all rows are finite if all their
squared distances from a reference row are), for the mean it is one check of the weighted sum per part, not per sender.

Evidence: for every sender the reducer records how many elements it contributed, how many were in parts whose
final clip scale was below ``heavy_clip_scale`` (i.e. the part lay farther than tau/heavy_clip_scale from the
aggregate), the smallest scale, and any rejection. That is what a verification subsystem can act on.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from athome.averaging.outputs import ReceiveBufferPool
from athome.numerics import all_finite

logger = logging.getLogger(__name__)

ReducerMethod = Literal["mean", "centered_clip"]
# below this largest squared deviation norm, float32 squares of the deviations may be denormal: G is built in float64
SMALLEST_SAFE_SQUARE = 1e-30
# a reference row farther from the start point than this multiple of the central rows' (RMS) distance from it is
# replaced by the most central row: distances computed from its Gram matrix would cancel away ~log10(ratio^2) digits
FAR_REFERENCE = 4.0
CENTRAL_TOLERANCE = 1e-4  # relative; float32 Gram entries carry ~1e-6 relative rounding
# the Gram matrix comes from the rows themselves (one matrix product, no deviations written) only when every two rows
# are at least this far apart, squared, relative to the largest squared row norm: its float32 rounding, ~5e-6 of
# that norm, then moves a squared distance by at most ~1e-4 (measured, 4 x 524288 values: 4e-5 at 0.16, 3.5e-4 at
# 0.02, 1e-2 at 2e-4). Gradients of different batches are that far apart; replicas' parameters are not
RAW_GRAM_MIN_SPREAD = 0.05
MAX_WORKSPACE_SHAPES = 8  # CenteredClip buffer shapes kept (a round needs ~2: full parts and the last, shorter one)
Workspace = Dict[tuple, Tuple[torch.Tensor, Optional[torch.Tensor]]]  # CenteredClip's buffers, by shape and dtype
REDUCER_METHODS: Tuple[str, ...] = ("mean", "centered_clip")


@dataclass
class SenderEvidence:
    """What one reducer observed about one sender during one round (only the slice that reducer owned)."""

    elements: int = 0  # elements accepted from this sender
    clipped_elements: int = 0  # elements in parts with final clip scale < heavy_clip_scale
    min_scale: float = 1.0  # smallest final CenteredClip scale over this sender's parts (1.0 = never clipped)
    claimed_weight: float = float("nan")
    used_weight: float = float("nan")  # after capping
    rejected: Optional[str] = None  # why the sender was excluded (non-finite part, bad weight, bad shape)

    @property
    def clip_fraction(self) -> float:
        """Fraction of this sender's accepted elements that were heavily clipped; 1.0 if it was rejected."""
        if self.rejected is not None:
            return 1.0
        return self.clipped_elements / self.elements if self.elements else 0.0


def _median_of_floats(values: Sequence[float]) -> float:
    """The median of floats, the mean of the two middle values for even counts."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def centered_clip(
    stacked: Union[torch.Tensor, Sequence[torch.Tensor]], weights: torch.Tensor, clip_tau: float, iterations: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CenteredClip of ``n`` senders' vectors (``stacked[i]``, shape ``[d]``) with non-negative ``weights`` (sum > 0).

    :param stacked: an ``[n, d]`` tensor or a sequence of ``n`` float tensors of shape ``[d]`` (the reducer passes
      the parts as they arrived: no stacked copy)
    :returns: (aggregate of shape [d], final per-sender clip scale in (0, 1]); inputs must be finite (the reducer
      checks afterwards, see :func:`_centered_clip`)
    """
    matrix = stacked if isinstance(stacked, torch.Tensor) else None
    rows = list(matrix.unbind(0)) if matrix is not None else list(stacked)
    center, scale, _ = _centered_clip(rows, weights, clip_tau, iterations, stacked=matrix)
    return center, scale


def _centered_clip(
    rows: List[torch.Tensor],
    weights: torch.Tensor,
    clip_tau: float,
    iterations: int,
    workspace: Optional[Workspace] = None,
    out: Optional[torch.Tensor] = None,
    stacked: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
    """:func:`centered_clip` of 1-D ``rows``; also returns the squared distances of the rows from a reference row.

    If every squared distance is finite, every row is finite: a NaN/Inf in a row other than the reference makes that
    row's deviation non-finite, and one in the reference makes every other row's deviation non-finite (x - Inf,
    Inf - Inf, x - NaN); a single row is checked directly. The converse fails only if a finite deviation exceeds the
    float32 range (rows of opposite signs near 3e38); the squares of float32 values cannot overflow G's float64.

    :param workspace: buffers kept between calls, keyed by shape and dtype (a caller reducing part after part saves
      the page faults of fresh multi-megabyte buffers: measured ~15% of the time per part)
    :param out: a 1-D tensor of the rows' size and dtype that receives the aggregate (else a new tensor)
    :param stacked: the rows as one contiguous float32 ``[n, d]`` matrix (``rows[i]`` is ``stacked[i]``), if they
      are: then the Gram matrix is tried from the rows themselves (:func:`_raw_gram`), which writes no deviations
    """
    # Every iterate lies in the affine hull of the rows,  x_r + span(Y),  Y = rows - x_r for a reference row r, so
    # it is kept as coefficients beta (center = x_r + beta @ Y) and every distance comes from the Gram matrix
    # G = Y Y^T:  ||y_i - beta @ Y||^2 = G_ii - 2 (G beta)_i + beta^T G beta,  ||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij.
    # The d-sized work is n - 1 subtractions, G and the final combination; the n-sized iterations, the start point
    # and the clip radii cost nothing next to them (Python floats, float64; as n-element tensors their ~10 small
    # ops per iteration cost a third of the whole call). The reference must be an honest-looking row: deviations
    # from a far-away row (an attacker's x1000 or 1e30 values) would round the honest rows' differences away in
    # float32. The first row is tried; if it is far from most rows, Y and G are recomputed from the most central row.
    # G is computed in float32 (4x faster than float64; measured, 4 x 262144: 0.32 vs 1.27 ms), with a relative
    # error of ~1e-6 on distances that only set clip scales; where float32 cannot hold G (squares overflowing past
    # ~1e19, or underflowing below ~1e-19) it is recomputed in float64. When the rows are one matrix X and far apart
    # (gradients of different batches), G comes from X X^T instead, and the result from X^T c (_raw_gram).
    n, dtype = len(rows), rows[0].dtype
    if n == 1:
        squared_norms = [0.0 if all_finite(rows[0]) else math.inf]
        return _copy(rows[0], out), torch.ones(1, dtype=dtype), squared_norms
    raw = _raw_gram(stacked) if stacked is not None else None

    def gram_from(reference: int) -> Tuple[Optional[List[List[float]]], Optional[torch.Tensor]]:
        if raw is not None:  # G for any reference row from X X^T, without a pass over the data
            return _gram_around(raw, reference), None
        return _gram_from(rows, reference, workspace)

    reference = 0
    gram, deviations = gram_from(reference)
    if gram is None:  # every row equals the first (replicas that have not diverged since the last round)
        return _copy(rows[0], out), torch.ones(n, dtype=dtype), [0.0] * n
    fractions = (weights / weights.sum()).double().tolist()
    beta, central, spreads = _start_point(gram, fractions)
    if not central[reference]:
        distance = _distances(gram, beta)
        typical = math.sqrt(sum(d * d for d, c in zip(distance, central) if c) / sum(central))
        if not distance[reference] <= FAR_REFERENCE * typical:  # also when not finite
            reference = min(range(n), key=spreads.__getitem__)
            gram, deviations = gram_from(reference)
            if gram is None:  # only non-finite rows can look far from rows they equal
                gram = [[math.nan] * n for _ in range(n)]
            beta, central, spreads = _start_point(gram, fractions)
    squared_norms = [gram[i][i] for i in range(n)]

    def clip_scale(beta: List[float]) -> List[float]:
        distance = _distances(gram, beta)
        radius = clip_tau * _median_of_floats(distance)
        return [radius / max(dist, 1e-30) if dist > radius else 1.0 for dist in distance]

    for _ in range(iterations):
        step = [fraction * scale for fraction, scale in zip(fractions, clip_scale(beta))]
        total = sum(step)  # center += sum_i step_i (y_i - center)
        beta = [b * (1 - total) + s for b, s in zip(beta, step)]
    if raw is not None:  # center = x_r + sum_i beta_i (x_i - x_r) = X^T c, c = beta but c_r = 1 - sum_{i != r} beta_i
        coefficients = list(beta)
        coefficients[reference] = 1.0 - (sum(beta) - beta[reference])
        center = torch.mv(stacked.T, torch.tensor(coefficients, dtype=dtype), out=out)
    else:
        others = beta[:reference] + beta[reference + 1 :]  # the reference row's deviation is zero: not in Y
        center = torch.addmv(rows[reference], deviations.T, torch.tensor(others, dtype=dtype), out=out)
    return center, torch.tensor(clip_scale(beta), dtype=dtype), squared_norms


def _copy(row: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return row.clone() if out is None else out.copy_(row)


def _gram_from(
    rows: List[torch.Tensor], reference: int, workspace: Optional[Workspace]
) -> Tuple[Optional[List[List[float]]], torch.Tensor]:
    """``(G, Y)``: the deviations ``Y`` of the rows other than ``reference`` from it (a workspace buffer), and the
    ``n x n`` Gram matrix of all rows' deviations as float64 lists (the reference's row and column are zeros).
    G is None if every deviation is zero."""
    n, dtype = len(rows), rows[0].dtype
    key = (n - 1, rows[0].numel(), dtype)
    buffers = workspace.get(key) if workspace is not None else None
    if buffers is None:
        buffers = torch.empty(key[:2], dtype=dtype), None
        if workspace is not None:
            if len(workspace) >= MAX_WORKSPACE_SHAPES:  # group or part sizes changed: drop the old shapes
                workspace.clear()
            workspace[key] = buffers
    deviations, deviations64 = buffers
    others = rows[:reference] + rows[reference + 1 :]
    for row, deviation in zip(others, deviations.unbind(0)):
        torch.sub(row, rows[reference], out=deviation)
    partial = _gram(deviations)
    largest_square = max(partial[i][i] for i in range(n - 1))
    if largest_square == 0.0 and not bool(deviations.any()):
        return None, deviations
    if not (all(map(math.isfinite, itertools.chain(*partial))) and largest_square > SMALLEST_SAFE_SQUARE):
        # float32 squares overflowed (values beyond ~1e19), a row is not finite, or the spread is so small that
        # float32 squares lose precision: the same Gram matrix in float64 (4x slower: not the common case)
        if deviations64 is None:
            deviations64 = torch.empty(key[:2], dtype=torch.float64)
            if workspace is not None:
                workspace[key] = deviations, deviations64
        partial = _gram(deviations64.copy_(deviations))
    for row in partial:
        row.insert(reference, 0.0)
    partial.insert(reference, [0.0] * n)
    return partial, deviations


def _raw_gram(stacked: torch.Tensor) -> Optional[List[List[float]]]:
    """``X X^T`` of the rows of a contiguous float32 matrix as float64 lists, or None where it cannot stand in for
    the deviations' Gram matrix: some entry is not finite (non-finite rows, or squares beyond float32), a row's
    values are so small that their float32 products lose precision (mean square below ``SMALLEST_SAFE_SQUARE``), or
    two rows are closer than ``RAW_GRAM_MIN_SPREAD`` allows (their distance would drown in the norms' rounding).

    One matrix product reads the rows once and writes nothing; the deviations' way writes n - 1 deviations first
    (measured, CenteredClip of 4 x 524288 values alone: 1.6-2.0 ms against 2.9-3.0 ms; in a round of 4 peers
    averaging 10M floats, where the rows come from memory rather than cache, ~3 ms less CPU per peer)."""
    if stacked.dtype != torch.float32 or not stacked.is_contiguous():
        return None
    raw = torch.mm(stacked, stacked.T).double().tolist()
    if not all(map(math.isfinite, itertools.chain(*raw))):
        return None
    n, values = len(raw), stacked.shape[1]
    if min(raw[i][i] for i in range(n)) < SMALLEST_SAFE_SQUARE * values:
        return None
    closest = min(raw[i][i] + raw[j][j] - 2 * raw[i][j] for i in range(n) for j in range(i + 1, n))
    return raw if closest >= RAW_GRAM_MIN_SPREAD * max(raw[i][i] for i in range(n)) else None


def _gram_around(raw: List[List[float]], reference: int) -> List[List[float]]:
    """The Gram matrix of the rows' deviations from row ``reference``, from the rows' own Gram matrix ``raw``:
    ``(x_i - x_r) . (x_j - x_r) = R_ij - R_ir - R_rj + R_rr``."""
    n = len(raw)
    anchor = raw[reference]
    return [[raw[i][j] - raw[i][reference] - anchor[j] + anchor[reference] for j in range(n)] for i in range(n)]


def _gram(vectors: torch.Tensor) -> List[List[float]]:
    """``vectors @ vectors.T`` as lists of floats, from one BLAS dot per pair (measured, 3 x 262144 float32:
    110 us against 250 us for torch's matmul of that shape, whose kernel is not made for k >> m, n)."""
    array = vectors.numpy()
    count = len(array)
    gram = [[0.0] * count for _ in range(count)]
    with np.errstate(all="ignore"):  # overflow is expected here and handled by the caller
        for i in range(count):
            for j in range(i, count):
                gram[i][j] = gram[j][i] = float(np.dot(array[i], array[j]))
    return gram


def _start_point(gram: List[List[float]], fractions: List[float]) -> Tuple[List[float], List[bool], List[float]]:
    """``(beta, central, spreads)``: each row's median distance to the others (``spreads``), the central rows (spread
    at most the median spread, within rounding, so that rows tied up to rounding are all in or all out, whatever
    their order), and the coefficients of their weighted mean, the start point."""
    spreads = _median_distances(gram)
    finite = [spread for spread in spreads if not math.isnan(spread)]
    limit = _median_of_floats(finite) * (1 + CENTRAL_TOLERANCE) if finite else math.nan
    central = [spread <= limit for spread in spreads]
    if not any(central):
        central = [True] * len(spreads)
    weighted = [f if c else 0.0 for c, f in zip(central, fractions)]
    total = sum(weighted)
    if total <= 0:  # every central row has weight 0
        weighted, total = [float(c) for c in central], sum(central)
    return [w / total for w in weighted], central, spreads


def _distances(gram: List[List[float]], beta: List[float]) -> List[float]:
    """Distances of every row from the point with coefficients ``beta``."""
    gram_beta = [sum(g * b for g, b in zip(gram_row, beta)) for gram_row in gram]
    beta_gram_beta = sum(b * g for b, g in zip(beta, gram_beta))
    return [math.sqrt(max(gram[i][i] - 2 * g + beta_gram_beta, 0.0)) for i, g in enumerate(gram_beta)]


def _median_distances(gram: List[List[float]]) -> List[float]:
    """For each row, the median of its distances to the other rows (NaN stays NaN: never the minimum)."""
    n = len(gram)
    spreads = []
    for i in range(n):
        distances = [math.sqrt(max(gram[i][i] + gram[j][j] - 2 * gram[i][j], 0.0)) for j in range(n) if j != i]
        spreads.append(math.nan if any(map(math.isnan, distances)) else _median_of_floats(distances))
    return spreads


class RobustTensorPartReducer(TensorPartReducer):
    """A :class:`hivemind.averaging.partition.TensorPartReducer` that aggregates each part with ``method`` and
    rejects malformed input (see module docstring). Same interface and protocol as hivemind's reducer.

    :param part_shapes: shapes of the parts this peer reduces
    :param num_senders: number of group members that send parts
    :param method: "centered_clip" or "mean"
    :param clip_tau: CenteredClip radius as a multiple of the median distance to the current estimate
    :param clip_iterations: CenteredClip iterations per part
    :param max_weight_ratio: (centered_clip) cap claimed weights at this multiple of the median positive weight
    :param heavy_clip_scale: parts whose final clip scale is below this count as "clipped" in the evidence
    :param outputs: per part, a float32 tensor of the part's size that receives its aggregate (the runner passes the
      output slices of its own slice: the aggregate then needs no copy there); None allocates them
    :param workspace: CenteredClip's scratch buffers, kept by the caller from round to round (each round builds a
      new reducer; fresh buffers would be faulted in again); None keeps them for this reducer only
    :param row_pool: (centered_clip) where the ``[num_senders, numel]`` matrix of each part's rows comes from
      (:class:`~athome.averaging.outputs.ReceiveBufferPool`; given back by :meth:`release_rows`); None allocates them.
      Senders' parts are received into their rows (:meth:`receive_row`) or copied there, so that a part's rows are
      one matrix: see :func:`_raw_gram`
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        outputs: Optional[Sequence[torch.Tensor]] = None,
        workspace: Optional[Workspace] = None,
        row_pool: Optional[ReceiveBufferPool] = None,
        method: ReducerMethod = "centered_clip",
        clip_tau: float = 1.0,
        clip_iterations: int = 5,
        max_weight_ratio: float = 1.0,
        heavy_clip_scale: float = 0.5,
    ):
        if method not in REDUCER_METHODS:
            raise ValueError(f"unknown reducer {method!r}; expected one of {REDUCER_METHODS}")
        if not clip_tau > 0 or clip_iterations < 1 or not max_weight_ratio > 0:
            raise ValueError("clip_tau and max_weight_ratio must be positive, clip_iterations >= 1")
        self.method, self.clip_tau, self.clip_iterations = method, float(clip_tau), int(clip_iterations)
        self.max_weight_ratio, self.heavy_clip_scale = float(max_weight_ratio), float(heavy_clip_scale)
        self.evidence: List[SenderEvidence] = [SenderEvidence() for _ in range(num_senders)]
        self.num_parts_accumulated = [0 for _ in range(num_senders)]
        self._contributions: List[Tuple[int, torch.Tensor, float]] = []
        self._workspace = workspace if workspace is not None else {}
        self._row_pool = row_pool
        self._rows: Dict[int, torch.Tensor] = {}  # part index -> [num_senders, numel] float32 (centered_clip)
        if outputs is not None:
            if len(outputs) != len(part_shapes) or any(
                out.dtype != torch.float32 or out.numel() != shape.numel() or not out.is_contiguous()
                for out, shape in zip(outputs, part_shapes)
            ):
                raise ValueError("outputs must be contiguous float32 tensors, one of each part's size")
            outputs = [out.view(shape) for out, shape in zip(outputs, part_shapes)]
        self._outputs = outputs
        super().__init__(part_shapes, num_senders)  # calls self.reset_accumulators()

    def __del__(self):
        if hasattr(self, "finished"):  # not when __init__ refused its arguments
            super().__del__()

    def reset_accumulators(self):
        """Prepare for the next part."""
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self._contributions = []
        # "mean" accumulates as parts arrive, like hivemind (the first part with a positive weight initializes it);
        # "centered_clip" needs all parts at once
        self.accumulator = self._output(self.current_part_index) if self.method == "mean" else None
        self.denominator = 0.0

    def _output(self, part_index: int) -> torch.Tensor:
        """Where the aggregate of part ``part_index`` goes (uninitialized)."""
        if self._outputs is not None:
            return self._outputs[part_index]
        return torch.empty(self.part_shapes[part_index])

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Add a sender's part, wait for the other senders' parts, return the aggregate of this part.

        :raises BannedException: if the sender failed or its input was rejected (it is then excluded). A part's
          weight and shape are checked on arrival; whether it is finite is checked when the part is reduced
          (:meth:`_drop_non_finite`), so a sender of NaN/Inf is rejected only then, but before any aggregate uses
          its part.
        """
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            # the current part's future ends when that part is reduced, or is cancelled by finalize(): no task
            # watching `finished` is needed (hivemind creates one per wait, for every part a sender sends ahead)
            await asyncio.wait((self.current_part_future,))
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future

        reason = self._reason_to_reject(part_index, tensor_part, weight)
        if reason is None and any(sender == sender_index for sender, _, _ in self._contributions):
            # a second stream of the same sender in one round (a second ticket, or p2p beside TCP): counted twice,
            # its parts would close a part before an honest sender's arrived and vote twice in CenteredClip
            reason = "sent the same part twice (a second stream in one round)"
        if reason is not None:
            logger.warning(f"Rejecting sender {sender_index}, part {part_index}: {reason}")
            self.evidence[sender_index].rejected = reason
            self.on_sender_failed(sender_index)
            raise BannedException(f"sender {sender_index}: {reason}")

        self._add_contribution(sender_index, tensor_part, float(weight))
        self.num_parts_accumulated[sender_index] += 1
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        result = await current_part_future
        if self.sender_failed_after[sender_index] <= part_index:  # its part was dropped: _drop_non_finite
            raise BannedException(f"sender {sender_index}: {self.evidence[sender_index].rejected}")
        return result

    def receive_row(self, sender_index: int, part_index: int) -> Optional[torch.Tensor]:
        """The float32 row where ``sender_index``'s part ``part_index`` belongs (receive it there to save a copy),
        or None if this reducer does not keep rows (method "mean", or the reducer is finished)."""
        if self.method != "centered_clip" or self.finished.is_set():
            return None
        rows = self._rows.get(part_index)
        if rows is None:
            numel = self.part_shapes[part_index].numel()
            if self._row_pool is not None:
                rows = self._row_pool.take(self.num_senders * numel, torch.float32).view(self.num_senders, numel)
            else:
                rows = torch.empty(self.num_senders, numel)
            self._rows[part_index] = rows
        return rows[sender_index]

    def release_rows(self) -> None:
        """Give the parts' row matrices back to ``row_pool``. Only once nothing writes into them any more (every
        reader of received parts has ended) and the reducer is finished."""
        assert self.finished.is_set(), "release_rows() before the reducer finished"
        rows, self._rows = list(self._rows.values()), {}
        if self._row_pool is not None:
            self._row_pool.give([matrix.view(-1) for matrix in rows])

    def _reason_to_reject(self, part_index: int, tensor_part: torch.Tensor, weight: float) -> Optional[str]:
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            return f"invalid weight {weight!r}"
        if tensor_part.shape != self.part_shapes[part_index]:
            return f"part shape {tuple(tensor_part.shape)} != expected {tuple(self.part_shapes[part_index])}"
        return None

    def on_sender_failed(self, sender_index: int):
        """Exclude a sender from every part it has not contributed to yet. Idempotent.

        Unlike hivemind's version this counts parts *accumulated*, not parts received, so a sender banned while one
        of its parts waits in :meth:`accumulate_part` is not counted as a pending contributor of that part.
        """
        if self.sender_failed_after[sender_index] != float("inf"):
            return
        accumulated = self.num_parts_accumulated[sender_index]
        self.sender_failed_after[sender_index] = accumulated
        if self.finished.is_set():
            return
        if accumulated <= self.current_part_index:  # it was still expected to contribute to the current part
            self.num_current_senders -= 1
            self.check_current_part_finished()

    def check_current_part_finished(self):
        """Once every expected sender contributed, reduce the part (in the event loop: see :func:`centered_clip`'s
        cost) and start the next one."""
        # Inline, not in a thread: the thread handoffs and GIL traffic cost more CPU than they overlap (measured, one
        # reducer, 4 senders x 19 parts of 131072 fp32 with 4 parts in flight: 69 ms CPU per round through the
        # default executor, 59 through one dedicated thread, 48 inline), and parts stay in order, which lets a
        # non-finite part be rejected here, after it arrived: the next part, which must exclude it too, has not
        # started.
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            future = self.current_part_future
            if self.current_part_accumulated_from == 0:
                future.cancel()  # every sender of this part failed; nobody awaits it
            else:
                try:
                    # None when every sender was rejected: each of them raises BannedException after the await
                    future.set_result(self._current_result())
                except Exception as e:  # resolve the future anyway: the other senders are waiting on it
                    logger.exception(f"Reducing part {self.current_part_index} failed")
                    future.set_exception(e)
            self.reset_accumulators()

    def finalize(self):
        """Stop waiting for parts. Missing parts were already reported (as failed senders), so log at debug only."""
        if not self.finished.is_set():
            if hasattr(self, "current_part_future"):
                self.current_part_future.cancel()
            self._contributions = []
            self.finished.set()
            received, expected = sum(self.num_parts_accumulated), self.num_parts * self.num_senders
            if received != expected:
                logger.debug(f"Reducer finalized with {received}/{expected} parts accumulated")

    @torch.no_grad()
    def _add_contribution(self, sender: int, part: torch.Tensor, weight: float) -> None:
        record = self.evidence[sender]
        record.elements += part.numel()
        record.claimed_weight = record.used_weight = weight
        row = self.receive_row(sender, self.current_part_index)
        if row is not None and row.data_ptr() != part.data_ptr():
            part = row.copy_(part.reshape(-1))  # e.g. our own part (a view of the averaged tensor), or one via p2p
        self._contributions.append((sender, part, weight))  # "mean" keeps them too, in case one is not finite
        if self.method == "mean":
            self._accumulate(part, weight)

    def _accumulate(self, part: torch.Tensor, weight: float) -> None:
        if weight <= 0:
            return
        if self.denominator == 0:
            torch.mul(part, weight, out=self.accumulator)
        else:
            self.accumulator.add_(part, alpha=weight)
        self.denominator += weight

    def _drop_non_finite(self, contributions: List[Tuple[int, torch.Tensor, float]]):
        """Reject the senders of the non-finite parts among ``contributions`` (of the current part); return the rest.

        A rejected sender is treated as failed before this part: its part counts for nothing, it is excluded from
        every later part, and its :meth:`accumulate_part` raises BannedException instead of returning the result.
        """
        kept = []
        for sender, part, weight in contributions:
            if all_finite(part):
                kept.append((sender, part, weight))
                continue
            reason = "non-finite values (NaN/Inf) in part"
            logger.warning(f"Rejecting sender {sender}, part {self.current_part_index}: {reason}")
            record = self.evidence[sender]
            record.rejected = reason
            record.elements -= part.numel()
            self.num_parts_accumulated[sender] -= 1
            self.sender_failed_after[sender] = self.current_part_index
        return kept

    @torch.no_grad()
    def _current_result(self) -> Optional[torch.Tensor]:
        """The aggregate of the current part from its finite contributions (None if there are none)."""
        contributions = self._contributions
        if self.method == "centered_clip":
            contributions.sort(key=lambda contribution: contribution[0])  # in row order: see _clip
            result, weights, scale, finite = self._clip(contributions)
            if not finite:  # some row is not finite, or its deviation from the reference row overflowed float32
                kept = self._drop_non_finite(contributions)
                if not kept:
                    return None
                if len(kept) < len(contributions):
                    contributions = kept
                    result, weights, scale, _ = self._clip(contributions)
            self._record_clip(contributions, weights, scale)
            return result
        # "mean": one finiteness check of the weighted sum instead of one per part (a sum of parts with positive
        # weights is finite only if each of them is: NaN and Inf propagate, Inf - Inf is NaN); zero-weight parts
        # are not in the sum and are checked one by one
        summed_finite = self.denominator == 0 or all_finite(self.accumulator)
        if not (summed_finite and all(all_finite(part) for _, part, w in contributions if w == 0)):
            kept = self._drop_non_finite(contributions)
            if len(kept) < len(contributions):
                contributions = kept
                self.denominator = 0.0
                for _, part, weight in contributions:
                    self._accumulate(part, weight)
        if not contributions:
            return None
        if self.denominator > 0:
            return self.accumulator.div_(self.denominator)
        # every sender claimed weight 0: hivemind would return 0/0 = NaN; use the plain mean instead
        return torch.stack([part.to(torch.float32) for _, part, _ in contributions]).mean(dim=0)

    @torch.no_grad()
    def _clip(
        self, contributions: List[Tuple[int, torch.Tensor, float]]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """CenteredClip of one part's contributions: (result, capped weights, scale, whether every row's squared
        distance from the reference row is finite, which is the case for every finite row: see
        :func:`_centered_clip`)."""
        rows = [part.reshape(-1).to(torch.float32) for _, part, _ in contributions]
        # every sender's part in its row, in sender order: the part's matrix holds exactly these rows
        senders = [sender for sender, _, _ in contributions]
        stacked = self._rows.get(self.current_part_index) if senders == list(range(self.num_senders)) else None
        claimed = torch.tensor([weight for _, _, weight in contributions], dtype=torch.float32)
        positive = [weight for weight in claimed.tolist() if weight > 0]
        if not positive:
            weights = torch.ones_like(claimed)
        else:
            weights = claimed.clamp_max(self.max_weight_ratio * _median_of_floats(positive))
        out = self._outputs[self.current_part_index].view(-1) if self._outputs is not None else None
        result, scale, squared_norms = _centered_clip(
            rows, weights, self.clip_tau, self.clip_iterations, self._workspace, out=out, stacked=stacked
        )
        finite = all(math.isfinite(value) for value in squared_norms)
        return result.reshape(self.part_shapes[self.current_part_index]), weights, scale, finite

    def _record_clip(self, contributions, weights: torch.Tensor, scale: torch.Tensor) -> None:
        numel = contributions[0][1].numel()
        for row, (sender, _, _) in enumerate(contributions):
            record = self.evidence[sender]
            record.used_weight = float(weights[row])
            part_scale = float(scale[row])
            record.min_scale = min(record.min_scale, part_scale)
            if part_scale < self.heavy_clip_scale:
                record.clipped_elements += numel

    def evidence_by_sender(self, sender_names: Sequence[str]) -> Dict[str, SenderEvidence]:
        """Evidence keyed by sender name (e.g. peer ID string), for senders this reducer heard from."""
        assert len(sender_names) == self.num_senders
        return {
            name: record
            for name, record in zip(sender_names, self.evidence)
            if record.elements or record.rejected is not None
        }


@dataclass
class ReducerSettings:
    """How a peer reduces the slices it owns; picklable, so the averager process can build reducers from it."""

    method: ReducerMethod = "centered_clip"
    clip_tau: float = 1.0
    clip_iterations: int = 5
    max_weight_ratio: float = 1.0
    heavy_clip_scale: float = 0.5

    def __post_init__(self):
        if self.method not in REDUCER_METHODS:
            raise ValueError(f"unknown reducer {self.method!r}; expected one of {REDUCER_METHODS}")
        if not self.clip_tau > 0 or self.clip_iterations < 1 or not self.max_weight_ratio > 0:
            raise ValueError("clip_tau and max_weight_ratio must be positive, clip_iterations >= 1")

    def build(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        outputs: Optional[Sequence[torch.Tensor]] = None,
        workspace: Optional[Workspace] = None,
        row_pool: Optional[ReceiveBufferPool] = None,
    ) -> RobustTensorPartReducer:
        return RobustTensorPartReducer(
            part_shapes,
            num_senders,
            outputs=outputs,
            workspace=workspace,
            row_pool=row_pool,
            method=self.method,
            clip_tau=self.clip_tau,
            clip_iterations=self.clip_iterations,
            max_weight_ratio=self.max_weight_ratio,
            heavy_clip_scale=self.heavy_clip_scale,
        )
