"""Model resolution and the offline demo models."""
