"""Benchmarks: the built-in generated one and loaders for the published schemas."""
