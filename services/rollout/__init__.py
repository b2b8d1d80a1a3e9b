"""Rollout worker: pulls rollout requests, runs registered agents, publishes trajectories."""
