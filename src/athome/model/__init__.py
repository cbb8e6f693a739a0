"""The model: experts (hosted by volunteers), the MoE layer, and the byte-level transformer LM. Pure torch."""
from athome.model.expert import Expert, build_expert, expert_input_schema, uid_seed
from athome.model.lm import MoETransformerLM, build_local_model
from athome.model.moe import Dispatcher, LocalDispatcher, MoELayer

__all__ = [
    "Dispatcher",
    "Expert",
    "LocalDispatcher",
    "MoELayer",
    "MoETransformerLM",
    "build_expert",
    "build_local_model",
    "expert_input_schema",
    "uid_seed",
]
