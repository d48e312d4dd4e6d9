"""Uploaded data: file containers and formats, validation, the quality and personal-data report,
near duplicates, splits. No torch or transformers (checked by tests/test_layers.py)."""
