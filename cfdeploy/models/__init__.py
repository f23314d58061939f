"""PyTorch models that load the official files and compute what the official code computes."""
