"""Schemas of every athome DHT record (pydantic v2), and the key each one lives under.

hivemind's own ``SchemaValidator`` only understands pydantic v1 models (it fails on v2 with
``'FieldInfo' object has no attribute 'required'``), so athome checks schemas in its own validator
(:mod:`athome.dht.records`). Each record kind lives under one dictionary key per run; the subkey names the
writer, so one peer's record never collides with another's.
"""
from __future__ import annotations

import math
from typing import Annotated, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from athome.config import RunConfig

CONFIG_KEY = "athome.config"  # global: the subkey is the coordinator's, the run name is inside
MAX_RECORD_BYTES = 64 * 1024
UID_PATTERN = r"^[a-z][a-z0-9_]*(\.[0-9]+)+$"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
PublicName = Annotated[str, Field(max_length=64)]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RunConfigRecord(Record):
    """The run config, signed a second time inside the value so it can be checked without trusting the DHT."""

    config: dict
    published_at: Finite
    signature: bytes = Field(min_length=64, max_length=64)

    def parsed(self) -> RunConfig:
        return RunConfig.model_validate(self.config)


class ServerRecord(Record):
    """An expert host's declaration: which experts it serves, replicas allowed (many peers per uid)."""

    experts: list[Annotated[str, Field(pattern=UID_PATTERN, max_length=64)]] = Field(max_length=1024)
    public_name: PublicName = ""
    device: str = Field("cpu", max_length=32)
    precision: str = Field("fp32", pattern=r"^(fp32|bf16|fp16)$")
    throughput: Finite = Field(0.0, ge=0, description="samples/s this host measured for one expert")
    load: Finite = Field(0.0, ge=0, description="requests waiting in its pools when declared")
    relayed: bool = False
    since: Finite = 0.0
    expert_calls: int = Field(0, ge=0, description="cumulative forward+backward calls served")
    reported_at: Finite = 0.0


class MetricsRecord(Record):
    """A trainer's latest progress report, read by the coordinator."""

    step: int = Field(ge=0)
    loss: Finite = Field(ge=0)
    samples: int = Field(ge=0)
    samples_per_second: Finite = Field(ge=0)
    public_name: PublicName = ""
    time: Finite


class PeerRecord(Record):
    """Any live peer's presence: role, name and what it has done so far (self-reported)."""

    role: str = Field(pattern=r"^(coordinator|expert_host|trainer|client)$")
    public_name: PublicName = ""
    team: PublicName = ""
    started_at: Finite
    relayed: bool = False
    dashboard_url: str = Field("", max_length=256, pattern=r"^(https?://\S*)?$")


def run_record_keys(run_name: str) -> dict[str, type[Record]]:
    """Every key of a run's namespace with the schema its values must pass."""
    prefix = f"athome.{run_name}"
    return {
        f"{prefix}.servers": ServerRecord,
        f"{prefix}.metrics": MetricsRecord,
        f"{prefix}.peers": PeerRecord,
        f"{prefix}.commitments": CommitmentRecord,
        f"{prefix}.accusations": AccusationRecord,
        f"{prefix}.bans": BanRecord,
        f"{prefix}.suspicions": SuspicionRecord,
        f"{prefix}.receipts": ReceiptRecord,
        f"{prefix}.members": MemberRecord,
    }


def run_key(run_name: str, kind: str) -> str:
    key = f"athome.{run_name}.{kind}"
    if key not in run_record_keys(run_name):
        raise KeyError(f"unknown record kind {kind!r}")
    return key


# ------------------------------------------------------------------------------------------------- verification
# Records of athome.verification: trainers' commitments, validators' accusations, the coordinator's bans.
HexDigest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # BLAKE3-256
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # a corpus fingerprint (blake2b-128)
PeerIdText = Annotated[str, Field(pattern=r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")]
MAX_COMMITMENTS = 64
MAX_ACCUSATIONS = 16
MAX_BANS = 128


class StepCommitment(Record):
    """One trainer step, committed before its contribution is aggregated (hashes from ``athome.verification``)."""

    step: int = Field(ge=0)
    seed: int = Field(ge=0, lt=2**63)
    epoch: int = Field(ge=0, description="the optimizer epoch whose parameters the step ran on")
    loss: Finite = Field(ge=0, description="cross-entropy the trainer computed, nats/byte")
    samples: int = Field(ge=1, le=65536)
    params_hash: HexDigest
    grad_hash: HexDigest
    io_hash: HexDigest
    committed_at: Finite


class CommitmentRecord(Record):
    """A trainer's rolling window of its latest step commitments (one record per trainer, replaced every step)."""

    session: int = Field(ge=0, lt=2**63, description="random per trainer start: step numbers restart with it")
    precision: str = Field(pattern=r"^(fp32|bf16|fp16)$")
    device: str = Field("cpu", max_length=32)
    platform: str = Field("", max_length=96, description="numerics: device kind, kernel ISA, torch version")
    corpus: Fingerprint
    entries: list[StepCommitment] = Field(max_length=MAX_COMMITMENTS)


class Accusation(Record):
    """A validator's claim that ``accused`` cheated, with the evidence needed to re-verify it.

    Step accusations name the step and carry the accused's own signed commitment; expert accusations name the
    expert ``uid`` and carry the ``probe`` inputs (fp32 rows) on which the accused answered wrongly.
    """

    accused: PeerIdText
    kind: str = Field(pattern=r"^[a-z_]{1,32}$")
    step: int = Field(-1, ge=-1)
    session: int = Field(0, ge=0, lt=2**63)
    commitment: Optional[StepCommitment] = None
    figures: dict[Annotated[str, Field(max_length=32)], Finite] = Field(default_factory=dict, max_length=16)
    detail: str = Field("", max_length=256)
    uid: str = Field("", max_length=64)
    probe: bytes = Field(b"", max_length=2048, description="fp32 rows, e.g. 4 rows of d_model=128")
    at: Finite


class AccusationRecord(Record):
    """A validator's latest accusations (rolling)."""

    accusations: list[Accusation] = Field(max_length=MAX_ACCUSATIONS)


class BanEntry(Record):
    peer: PeerIdText
    kind: str = Field(pattern=r"^[a-z_]{1,32}$")
    reason: str = Field("", max_length=160)
    step: int = Field(-1, ge=-1)
    accuser: str = Field("", max_length=64)
    at: Finite


class BanRecord(Record):
    """The run's bans. Only the record the *coordinator* signed counts (its subkey names the run's peer ID)."""

    bans: list[BanEntry] = Field(max_length=MAX_BANS)


MAX_SUSPECTS = 16


class Suspicion(Record):
    """One trainer's observation that ``peer``'s averaging parts were heavily clipped (or rejected) by its reducer."""

    peer: PeerIdText
    rounds: int = Field(ge=1, description="rounds in which the reporter saw it (since the reporter started)")
    clip_fraction: Finite = Field(ge=0, le=1, description="share of its parts heavily clipped, latest round")
    at: Finite = Field(description="when the reporter last saw it (its clock)")


class SuspicionRecord(Record):
    """A trainer's hints for validators: peers to check first. Clipping is not proof; a hint never bans anyone."""

    suspects: list[Suspicion] = Field(max_length=MAX_SUSPECTS)


# ------------------------------------------------------------------------------------------------- credit and admission
MAX_RECEIPT_HOSTS = 512


class HostReceipt(Record):
    """What one trainer signs for one host: cumulative expert calls and token rows the host answered for it."""

    forward: int = Field(0, ge=0, le=2**53)
    backward: int = Field(0, ge=0, le=2**53)
    samples: int = Field(0, ge=0, le=2**53, description="token rows sent in the calls that were answered")


class ReceiptRecord(Record):
    """A trainer's signed receipts of the expert work each host did for it since the trainer started (``session``).

    Only the trainer can write it (owner subkey); the coordinator credits a host's expert work as the lesser of its
    own claim and the sum of these receipts from trainers that are not banned.
    """

    session: int = Field(ge=0, lt=2**63, description="random per trainer start: counters restart with it")
    time: Finite
    hosts: dict[PeerIdText, HostReceipt] = Field(max_length=MAX_RECEIPT_HOSTS)


class MemberRecord(Record):
    """An invite-only run's member: the invitation the coordinator signed for this peer (``peer invite``).

    Hosts and averagers admit a caller whose record holds a token that verifies for its peer ID
    (:mod:`athome.dht.auth`); the record being signed by its owner proves the owner presented the token.
    """

    token: str = Field(min_length=16, max_length=512)
