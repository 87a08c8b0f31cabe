"""Bulk masking: one mask per image of a collection, on one machine or a Ray cluster.

``config`` (the options), ``inputs`` (folders, manifests, tar shards, and which output each input
gets), ``naming`` (safe output paths), ``plan`` (checks before Ray), ``stages`` (decode and write,
no torch), ``predictor`` (the model), ``manifest`` (the record of every input) and
``ray_pipeline`` (the Ray Data pipeline, the only part that needs Ray). Design: docs/infer.md.
"""
