"""Training and evaluation data: ``discovery`` (image/mask pairs under a DUTS-layout root, the
held-out split), ``sample`` (the embedded synthetic sample) and ``ray_pipeline`` (Ray Data
pipelines that stream and decode them, the only part that needs Ray).
"""
