"""Parallelism helpers: meshes, logical-axis rules, multi-process start-up. Nothing model-specific."""

from sharding.mesh import BATCH_AXES, EXPERT_AXIS, MESH_AXES, TENSOR_AXIS, current_mesh, make_mesh
from sharding.rules import logical_to_spec

__all__ = [
    "BATCH_AXES",
    "EXPERT_AXIS",
    "MESH_AXES",
    "TENSOR_AXIS",
    "current_mesh",
    "logical_to_spec",
    "make_mesh",
]
