"""Generation engines (HF on CPU, vLLM on GPU) on Ray Data, and the local OpenAI-compatible server."""
