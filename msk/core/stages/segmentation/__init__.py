"""Lesion segmentation: training, evaluation, segmenting files."""
