"""A small olmoe (see configs/_families.py) trained from scratch on the laptop mesh, exportable with moe-export.

    moe-train --config=configs/olmoe_tiny.py --workdir=runs/olmoe_tiny
    moe-export --workdir=runs/olmoe_tiny --hf_dir=runs/olmoe_tiny_hf
"""

from _families import tiny


def get_config():
    return tiny("olmoe")
