"""Shared basics every layer may use: atomic file writes, the settings file, model-state tensors, initial weights."""
