"""The named random streams of a run: the salts that give each consumer of `cfg.seed` its own draws.

A view drawn per image (Soft Teacher's and PseCo's student views, STAC's strong views) seeds numpy
with [seed, salt, iteration, position]; the unlabeled loader shuffles with seed + its salt (the
labeled loader uses the seed itself). Every value is part of the results of the cells that draw
from it, while a cell's key does not contain it: the values never change.
"""

UNLABELED_LOADER = 7_919  # added to the seed: the unlabeled loader's order (bench/worker.py)
SOFTTEACHER_STUDENT_VIEW = 104_729  # adapters/softteacher.py
# PseCo's student views and STAC's strong views use one value (no run draws both)
PSECO_STUDENT_VIEW = STAC_STRONG_VIEW = 130_363  # adapters/pseco.py, adapters/stac.py
