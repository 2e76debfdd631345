"""Rollout engine: batched sampling that records the behaviour distribution of every token."""
