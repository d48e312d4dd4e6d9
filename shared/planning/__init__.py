"""Planning a job before any model runs: the model catalog and its facts, GPU classes and cost, the
"auto" hyperparameters with their reasons, the estimate, packing plans, the model card. No torch or
transformers (checked by tests/test_layers.py)."""
