"""The Table 1 study behind ``benchmarks/reproduce_table1.py``: :mod:`.running` (train and evaluate
every run, resumable), :mod:`.evaluating` (one trained run's scores), :mod:`.reporting` (tables,
plots, grids of ``docs/RESULTS.md``), :mod:`.config` (models, presets, the paper's numbers)."""
