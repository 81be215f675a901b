"""MMUnlearner's saliency on ZeRO-3 partitions: importance scores and the weight mask.

`scores.py` accumulates squared gradients into buffers the size of each rank's own partition;
`mask.py` turns them into a boolean mask with a threshold that every rank agrees on without
ever gathering a score.
"""
