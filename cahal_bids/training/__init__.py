"""Training: ground-truth preparation, physics-based pairs, losses, fitting zoos and segmenters."""
