"""W2SVD: weak-to-strong video distillation as a plain PyTorch library."""
