"""ImageNet evaluation metrics (ADM definitions) and the TF-Inception feature extractor."""
