"""Multi-turn agentic RL: environments, the multi-turn rollout with per-token provenance, turn-level credit
and the tokenisation-drift meter (docs/agents.md)."""
