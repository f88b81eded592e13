"""The model: MoE layers and the transformer. Pure math; no I/O, no command line."""

from moe.config import MoEConfig
from moe.layer import MoEFeedForward
from moe.routing import Routing

__all__ = ["MoEConfig", "MoEFeedForward", "Routing"]
