"""athome.verification: catching malicious volunteers by recomputation, not by trust.

- :mod:`.recording`, :mod:`.proof`: trainers record each step conditioned on the expert I/O they saw;
- :mod:`.commitments`: signed per-step commitments published before contributions are aggregated;
- :mod:`.replay`, :mod:`.calibration`: validators recompute a step; tolerances measured per precision;
- :mod:`.validator`, :mod:`.trust`: sampled spot checks, adaptive (BOINC-like) trust;
- :mod:`.bans`, :mod:`.board`: accusations, the coordinator's re-verification and signed bans;
- :mod:`.expert_checks`: host-side gradient guards, attestation / cross-checks / training probes of hosts;
- :mod:`.proofs`: bundles over p2p; :mod:`.integration`: what the peers call;
- :mod:`.attacks` (testing only, ``ATHOME_ALLOW_ATTACKS=1``), :mod:`.sim`: attack simulators, in-process swarm.
"""
import importlib
from typing import Any

# lazy, so that ``python -m athome.verification.calibration`` does not import itself twice
_EXPORTS = {
    "BanAuthority": "bans",
    "BanWatcher": "bans",
    "DHTBoard": "board",
    "MemoryHub": "board",
    "Tolerances": "calibration",
    "tolerances_for": "calibration",
    "CommitmentBook": "commitments",
    "CommitmentWindow": "commitments",
    "commit": "commitments",
    "ExpertAuditor": "expert_checks",
    "GradNormGuard": "expert_checks",
    "ReplicaCrossCheck": "expert_checks",
    "training_probe": "expert_checks",
    "LayerIO": "proof",
    "StepProof": "proof",
    "RecordingDispatcher": "recording",
    "StepRecorder": "recording",
    "ReplayDispatcher": "replay",
    "Replayer": "replay",
    "compare": "replay",
    "TrustSampler": "trust",
    "CheckResult": "validator",
    "StepChecker": "validator",
    "Validator": "validator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
