"""Teacher side: topics, brainstorming, prompts, the OpenAI-compatible client, parsing, teacher stages."""
