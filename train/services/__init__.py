"""What a run uses around its training core (``train.core``): the run folder and its lock
(``workdir``), signals and the watchdog, the profiler, the metrics file and console lines, the router
telemetry, memory estimates. They import nothing from the core, the command lines, inference or
interop."""
