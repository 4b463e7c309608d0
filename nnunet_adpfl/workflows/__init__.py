"""End-to-end workflows composed of stages: demo, simulate, compare, fed-compare, pretrain, recipe."""
