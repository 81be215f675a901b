"""dsunlearn: make a multimodal LLM forget a visual concept, on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
