"""Synthetic data sets (one module per task) and the split of a data set into sites."""
