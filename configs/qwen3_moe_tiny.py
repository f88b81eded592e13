"""A small qwen3_moe (see configs/_families.py) trained from scratch on the laptop mesh, exportable with moe-export.

    moe-train --config=configs/qwen3_moe_tiny.py --workdir=runs/qwen3_moe_tiny
    moe-export --workdir=runs/qwen3_moe_tiny --hf_dir=runs/qwen3_moe_tiny_hf
"""

from _families import tiny


def get_config():
    return tiny("qwen3_moe")
