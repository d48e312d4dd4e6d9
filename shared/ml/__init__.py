"""What runs models: loading, tokenization of each data kind, packing into tensors, the token cache,
metrics computed from models, export. Imported only by workers."""
