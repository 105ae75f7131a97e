"""Tests of the policy language: documents, sources, decisions, windows, diffs, simulation."""
