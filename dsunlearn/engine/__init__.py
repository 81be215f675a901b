"""Distributed engine: process group set-up, DeepSpeed configs and ZeRO-3 engines."""
