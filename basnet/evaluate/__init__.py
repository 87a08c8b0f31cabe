"""Evaluation with the standard salient-object metrics: ``config`` (the job's options and what they
resolve to), ``matching`` (pairing predictions with ground truth), ``scoring`` (one process),
``report`` (metrics.json, tables, curves, contact sheets) and ``ray_scoring`` (in parallel with Ray
Data, and predicting with a checkpoint first through the bulk-masking pipeline).
"""
