"""Schemas of every athome DHT record (pydantic v2), and the key each one lives under.

hivemind's own ``SchemaValidator`` only understands pydantic v1 models (it fails on v2 with
``'FieldInfo' object has no attribute 'required'``), so athome checks schemas in its own validator
(:mod:`athome.dht.records`). Each record kind lives under one dictionary key per run; the subkey names the
writer, so one peer's record never collides with another's.
"""
from __future__ import annotations

import math
from typing import Annotated

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
    }


def run_key(run_name: str, kind: str) -> str:
    key = f"athome.{run_name}.{kind}"
    if key not in run_record_keys(run_name):
        raise KeyError(f"unknown record kind {kind!r}")
    return key
