"""Exact and MinHash-LSH near-duplicate removal, and quality filters."""
