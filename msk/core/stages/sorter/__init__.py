"""The anatomical sorter (SAM-X): training, evaluation, sorting files, transfer to small tasks."""
