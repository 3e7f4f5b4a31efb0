"""Running under a scheduler: stop signals and the time limit (signals.py), SLURM facts (slurm.py), hung ranks
and lost ranks (watchdog.py), slow ranks (stragglers.py). Nothing here imports torch at module level, so the
stop signal can be honoured from the first moment of the process."""
