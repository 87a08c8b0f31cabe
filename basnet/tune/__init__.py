"""Hyperparameter searches over the training job: ``config`` (the search's options), ``space`` (the
YAML search space, checked before anything runs), ``sizing`` (trials that fit the cluster),
``results`` (the trials table and the best trial's files) and ``ray_search`` (Ray Tune). Design:
docs/tune.md.
"""
