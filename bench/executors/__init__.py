"""Executors run cells: submit, poll, cancel. The local one uses worker subprocesses; a Slurm
executor (submitit) plugs in behind the same three methods."""
