"""`dsunlearn audit`: attacks that look for forgotten knowledge that only hides (relearning,
quantization, identity probes, rephrased images, membership inference), each applied alike to
the audited model, the gold model and the vanilla model."""
