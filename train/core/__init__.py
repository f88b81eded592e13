"""Training core: config, step, loop, optimizer, checkpoints, metrics and the run folder."""
