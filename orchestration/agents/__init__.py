"""Agents: the base contract, the demo agents and the OpenAI-compatible chat agent."""
