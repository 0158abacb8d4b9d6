"""MTEB evaluation: hub benchmarks, offline local tasks, embedding cache, comparisons."""
