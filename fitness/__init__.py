"""Cheap scoring of candidate merges: benchmarks, evaluation, IRT and estimators."""
