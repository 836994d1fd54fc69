"""Measuring and predicting a run's cost: tensor memory (memory.py), the memory and FLOPs estimator behind
`scaletrain estimate` (estimate.py), and the timed sweeps of `scaletrain bench` (bench.py)."""
