"""Helpers shared by the run and sweep layers: model complexity, results files, launching."""
