"""A small gpt_oss (see configs/_families.py) trained from scratch on the laptop mesh, exportable with moe-export.

    moe-train --config=configs/gpt_oss_tiny.py --workdir=runs/gpt_oss_tiny
    moe-export --workdir=runs/gpt_oss_tiny --hf_dir=runs/gpt_oss_tiny_hf
"""

from _families import tiny


def get_config():
    return tiny("gpt_oss")
