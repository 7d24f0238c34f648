"""The progressive scheduler and its run directory: the phase table and `run()` (`scheduler`), the run dir
(`rundir`), pre-flight checks, the memory plan (`--dry-run`), comparing runs."""
