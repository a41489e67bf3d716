"""Reading and writing files: DICOM and its de-identification, manifests, dataset shards, masks, checkpoints,
ground truth.
"""
