"""Restore a checkpoint anywhere: score it (moe-eval) or sample from it (moe-generate)."""
