"""Metrics, folder evaluation, the comparison report and the gradient-alignment analysis."""
