"""DP-Morph: the differentiable morphological refinement and its post-processing search."""
