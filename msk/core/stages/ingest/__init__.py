"""Ingest: archives of DICOM/PNG/JPEG/BMP/TIFF into de-identified Parquet shards; labelled layouts through the
msk_datasets hook.
"""
