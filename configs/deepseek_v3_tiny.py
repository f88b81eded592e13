"""A small deepseek_v3 (see configs/_families.py) trained from scratch on the laptop mesh, exportable with moe-export.

    moe-train --config=configs/deepseek_v3_tiny.py --workdir=runs/deepseek_v3_tiny
    moe-export --workdir=runs/deepseek_v3_tiny --hf_dir=runs/deepseek_v3_tiny_hf
"""

from _families import tiny


def get_config():
    return tiny("deepseek_v3")
