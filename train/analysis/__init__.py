"""Benchmarks (moe-bench layer, moe-bench train) and plots (moe-plot)."""
