"""Contrastive embedder training: InfoNCE with hard and cross-worker negatives, GradCache, LoRA."""
