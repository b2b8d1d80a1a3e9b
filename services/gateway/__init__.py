"""Gateway: the HTTP API (FastAPI). Takes tasks, publishes rollout requests, reads through the store."""
