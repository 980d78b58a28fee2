"""Shared task code for server and client: config, data, partitions, model, evaluation."""
