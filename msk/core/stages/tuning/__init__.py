"""Hyperparameter search with Ray Tune over the tasks plugins contribute."""
