"""Ray Serve app with an OpenAI-compatible embeddings API."""
