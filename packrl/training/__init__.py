"""The training run's infrastructure: config schema, process groups, metrics."""
