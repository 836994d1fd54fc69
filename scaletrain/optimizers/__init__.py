"""Optimizers and LR schedules under HF's `optim` names: which names are built and why the others are
refused (catalog.py), and how the optimizer and schedule are built for a model (factory.py)."""
