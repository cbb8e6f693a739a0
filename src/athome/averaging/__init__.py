"""athome.averaging: robust Moshpit averaging on top of hivemind 1.1.12 (hivemind itself is not modified).

- :mod:`.reducer`: CenteredClip / mean reducers that reject NaN and capped weights, with per-sender evidence;
- :mod:`.compression`: "none" / "fp16" / "uint8" codecs (8-bit decode fixed for numpy 2);
- :mod:`.allreduce`: the all-reduce runner using them, plus the round errors;
- :mod:`.timeouts`: time limits derived from measured throughput;
- :mod:`.averager`: ``RobustAverager`` and ``RobustGradientAverager`` (all-or-nothing rounds, round reports);
- :mod:`.consistency`: survivors of a round end it the same way (incomplete members repair from complete ones);
- :mod:`.replica`: ``ExpertReplicaAverager``, periodic averaging of an expert's replicas.
"""
from athome.averaging.allreduce import PartialRoundError, RobustAllReduceRunner, RoundTimeoutError
from athome.averaging.averager import (
    RobustAverager,
    RobustAveragingMixin,
    RobustGradientAverager,
    RobustTrainingStateAverager,
    RoundReport,
)
from athome.averaging.compression import (
    CODEC_NAMES,
    deserialize_tensor,
    get_codec,
    install_fixed_8bit_codecs_in_hivemind,
    serialize_tensor,
)
from athome.averaging.reducer import RobustTensorPartReducer, SenderEvidence, centered_clip
from athome.averaging.replica import ExpertReplicaAverager, averaging_prefix, moshpit_initial_bits
from athome.averaging.timeouts import AdaptiveTimeouts, RoundTimeouts

__all__ = [
    "AdaptiveTimeouts",
    "CODEC_NAMES",
    "ExpertReplicaAverager",
    "PartialRoundError",
    "RobustAllReduceRunner",
    "RobustAverager",
    "RobustAveragingMixin",
    "RobustGradientAverager",
    "RobustTrainingStateAverager",
    "RobustTensorPartReducer",
    "RoundReport",
    "RoundTimeoutError",
    "RoundTimeouts",
    "SenderEvidence",
    "averaging_prefix",
    "centered_clip",
    "deserialize_tensor",
    "get_codec",
    "install_fixed_8bit_codecs_in_hivemind",
    "moshpit_initial_bits",
    "serialize_tensor",
]
