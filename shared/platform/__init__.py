"""The platform: settings, storage, Redis, queues, job records and states, workers, recovery,
cancellation, metrics, keys and usage. No torch or transformers (checked by tests/test_layers.py)."""
