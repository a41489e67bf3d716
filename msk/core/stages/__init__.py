"""One package per pipeline step (ingest -> cluster -> sorter / segmentation / recommender / fusion; tuning).

A stage imports building blocks (io, data, models, runtime) and never another stage; tests/test_layout.py
enforces it.
"""
