"""Optuna studies over the benchmark's cells: Figure 5's threshold curves, Table 5's PIM ablation,
joint TPE tuning. A trial is a cell run through `bench.worker.run_cell` (same cache, same MLflow
tracking); see studies/run.py for resuming and workers, studies/mlflow_callback.py for the runs.
"""
