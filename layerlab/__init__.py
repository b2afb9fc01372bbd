"""layerlab: layer-wise analysis of adversarial training."""
