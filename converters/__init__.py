"""PyTorch -> Flax checkpoint converters, one module per source family."""
