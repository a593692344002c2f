"""Serving benchmark client (`thinktalk bench serve`): load generation, metrics, JSON results, plots."""
