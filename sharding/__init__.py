"""Parallelism helpers: meshes, logical-axis rules, multi-process start-up. Nothing model-specific."""

from sharding.mesh import BATCH_AXES, EXPERT_AXIS, MESH_AXES, TENSOR_AXIS, current_mesh, make_mesh
from sharding.rules import PRESETS, logical_to_spec, use_rules

__all__ = [
    "BATCH_AXES",
    "EXPERT_AXIS",
    "MESH_AXES",
    "PRESETS",
    "TENSOR_AXIS",
    "current_mesh",
    "logical_to_spec",
    "make_mesh",
    "use_rules",
]
