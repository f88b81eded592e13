"""The training core: the run config, the model's train state and step, the loop over it, the
optimizer and the checkpoints. The run's services (its folder, signals, watchdog, profiler, metrics,
telemetry, memory estimates) are in ``train.services``."""
