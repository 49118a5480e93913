"""Merging models trained from different initializations: permutation specs, weight matching, C2M3, REPAIR."""
