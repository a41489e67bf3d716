"""What is done to images and records before a model sees them: splits, regions of interest, preprocessing,
augmentation, clinical metadata.
"""
