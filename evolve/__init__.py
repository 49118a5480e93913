"""Multi-objective evolutionary search over merge parameters."""
