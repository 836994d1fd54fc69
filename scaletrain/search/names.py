"""The samplers and pruners a search names, as optuna classes (a table without importing optuna, so a
config can be checked where optuna is not installed)."""

SAMPLERS = {
    "tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "gp": "GPSampler",
    "cmaes": "CmaEsSampler", "qmc": "QMCSampler", "nsga2": "NSGAIISampler", "nsga3": "NSGAIIISampler",
    "bruteforce": "BruteForceSampler",
}
PRUNERS = {
    "median": "MedianPruner", "percentile": "PercentilePruner", "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner", "threshold": "ThresholdPruner", "wilcoxon": "WilcoxonPruner",
    "none": "NopPruner",
}
