"""The run config: one typed source of truth for a run, loaded from TOML and published signed in the DHT.

A run organizer writes ``run.toml`` (or uses the defaults below); ``peer coordinator`` signs it and every peer
that joins reads it from the DHT, so experts built by hosts and the trainers' model always agree.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RUN_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """A byte-level transformer LM whose FFN layers are mixtures of experts named ``{expert_prefix}.{layer}.{index}``."""

    vocab_size: int = Field(256, ge=2, le=65536)
    d_model: int = Field(128, ge=8, le=16384)
    n_layers: int = Field(2, ge=1, le=128)
    n_heads: int = Field(4, ge=1, le=256)
    seq_len: int = Field(64, ge=4, le=65536)
    expert_prefix: str = Field("ffn", pattern=r"^[a-z][a-z0-9_]*$")
    experts_per_layer: int = Field(4, ge=1, le=4096)
    expert_hidden: int = Field(256, ge=8, le=65536)
    top_k: int = Field(2, ge=1, le=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.top_k > self.experts_per_layer:
            raise ValueError(f"top_k={self.top_k} exceeds experts_per_layer={self.experts_per_layer}")
        return self

    def expert_uids(self) -> list[str]:
        """Every expert uid of the grid, layer-major: ``ffn.0.0, ffn.0.1, ..., ffn.1.0, ...``."""
        return [
            f"{self.expert_prefix}.{layer}.{index}"
            for layer in range(self.n_layers)
            for index in range(self.experts_per_layer)
        ]


class OptimizerConfig(_Strict):
    """AdamW for both the experts (on their hosts) and the trainers' dense parameters."""

    expert_lr: float = Field(1e-3, gt=0, le=10)
    # 5e-4: with worker momentum (below), AdamW normalizes the averaged momentum by its own smaller second moment,
    # so steps are larger than on raw gradients; measured (bench/convergence.py's centralized reference, 2 trainers'
    # batches, 150 steps): training loss 2.274 at 5e-4, 2.39 at 1e-3, against 2.282 for plain AdamW at 1e-3
    dense_lr: float = Field(5e-4, gt=0, le=10)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    expert_accumulation: int = Field(1, ge=1, le=1024, description="backward calls per expert optimizer step")


class AveragingConfig(_Strict):
    """Moshpit averaging of expert replicas and of trainers' dense parameters."""

    target_group_size: int = Field(4, ge=2, le=1024)
    period: float = Field(30.0, gt=0, description="seconds between expert-replica averaging rounds")
    compression: Literal["none", "fp16", "uint8"] = "fp16"
    reducer: Literal["mean", "centered_clip"] = "centered_clip"
    clip_tau: float = Field(1.0, gt=0)
    clip_iterations: int = Field(5, ge=1, le=100)
    target_batch_size: int = Field(64, ge=1, description="samples the swarm accumulates per dense optimizer step")
    worker_momentum: bool = Field(
        True, description="each trainer keeps the dense optimizer's first moment (optimizer.betas[0]) of its own "
                          "gradients and the swarm averages those instead of gradients (CenteredClip on low-variance "
                          "momenta); AdamW then runs with betas (0, betas[1]). Off: plain gradients are averaged"
    )
    direct_tcp: bool = Field(
        True, description="move all-reduce tensor parts over direct TCP between group members (tickets over p2p; "
                          "falls back to p2p per pair). Off: everything through libp2p, encrypted"
    )
    same_host_reads: bool = Field(
        True, description="on the direct plane, group members of one user on one host copy each other's parts, "
                          "uncompressed, from shared memory (Linux) instead of receiving them over TCP"
    )


class VerificationConfig(_Strict):
    check_rate: float = Field(0.05, ge=0, le=1)
    tolerance_fp32: float = Field(1e-4, gt=0)
    tolerance_bf16: float = Field(5e-2, gt=0)
    tolerance_fp16: float = Field(1e-2, gt=0)
    audit_period: float = Field(
        30.0, ge=0,
        description="seconds between the coordinator's host audits (0: none). Each audit's training probe sends its "
                    "replicas of one expert a backward call on random data: one optimizer step in a random direction",
    )


class DataConfig(_Strict):
    """Where tokens come from. ``stdlib`` is the Python standard library's own source, shipped with Python."""

    source: Literal["stdlib", "files", "hf"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="files or globs, for source='files'")
    hf_dataset: str = ""
    hf_split: str = "train"
    hf_text_field: str = "text"
    max_bytes: int = Field(16_000_000, ge=1024)
    validation_fraction: float = Field(0.02, ge=0, lt=0.5)
    corpus_fingerprint: str = Field(
        "", pattern=r"^[0-9a-f]*$", description="blake2b of the corpus bytes; filled in by the coordinator"
    )

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("data.source='files' needs data.paths, e.g. paths = ['corpus/*.txt']")
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError("data.source='hf' needs data.hf_dataset (a name or a local path)")
        return self


class RunConfig(_Strict):
    """Everything peers of one run must agree on. Published by the coordinator, signed by its key."""

    name: str = Field("demo", pattern=RUN_NAME_PATTERN)
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    averaging: AveragingConfig = AveragingConfig()
    verification: VerificationConfig = VerificationConfig()
    data: DataConfig = DataConfig()
    batch_size: int = Field(16, ge=1, le=65536, description="sequences per trainer step")
    expert_ttl: float = Field(30.0, ge=5, description="seconds a peer's declarations live without refresh")
    wire_compression: Literal["none", "fp16"] = Field(
        "fp16", description="activations and gradients between trainers and experts: fp16 (per-row scaled) or exact"
    )

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @property
    def key_prefix(self) -> str:
        """All DHT keys of this run start with this: one run, one namespace."""
        return f"athome.{self.name}"

    def dense_momentum(self) -> tuple[float, tuple[float, float]]:
        """(worker momentum beta, AdamW betas) of the trainers' dense update: with ``averaging.worker_momentum`` the
        first moment is kept per trainer, before the robust aggregation, instead of inside AdamW after it."""
        first, second = self.optimizer.betas
        return (first, (0.0, second)) if self.averaging.worker_momentum else (0.0, (first, second))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad field and value."""


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid run config ({origin}):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field} = {shown}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None


def load_config(path: str | Path | None) -> RunConfig:
    """Load a run config from TOML, or the built-in default when ``path`` is None."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read run config {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"run config {path} is not valid TOML: {error}") from None
    return parse_config(data, origin=str(path))


def dump_toml(config: RunConfig) -> str:
    """Write a config as TOML (the subset our configs use: scalars, lists and tables)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(scalar(item) for item in value) + "]"
        raise TypeError(f"cannot write {type(value)} to TOML")

    data = config.to_dict()
    top = [f"{key} = {scalar(value)}" for key, value in data.items() if not isinstance(value, dict)]
    tables = [
        f"\n[{key}]\n" + "\n".join(f"{k} = {scalar(v)}" for k, v in value.items())
        for key, value in data.items()
        if isinstance(value, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def is_valid_run_name(name: str) -> bool:
    return re.match(RUN_NAME_PATTERN, name) is not None
