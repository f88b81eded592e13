"""A small mixtral (see configs/_families.py) trained from scratch on the laptop mesh, exportable with moe-export.

    moe-train --config=configs/mixtral_tiny.py --workdir=runs/mixtral_tiny
    moe-export --workdir=runs/mixtral_tiny --hf_dir=runs/mixtral_tiny_hf
"""

from _families import tiny


def get_config():
    return tiny("mixtral")
