"""Listen: a DICOM C-STORE receiver (pynetdicom) that spools what modalities and PACS send, durably,
for ``msk ingest`` to take in.
"""
