"""OpenAI-compatible inference service with a batching torch engine (`python -m services.inference`)."""
