"""Federated learning: protocol files and signing, the aggregator, strategies, the site client, federated planning, the ``federation`` commands."""
