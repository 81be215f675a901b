"""Evaluation: metric functions, sharded scoring under ZeRO-3, and the metric suite."""
