"""Policies, approval tiers and cost ceilings (a later issue; the engine calls in at the boundary)."""
