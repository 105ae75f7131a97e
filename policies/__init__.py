"""What the system may do: versioned policy documents (rules, approval tiers, allowlists, time
windows, rate limits, bounds), their evaluation before every agent action, tenants and roles,
and the spend ledger that keeps every cost ceiling. The engine calls in at the boundary; this
app never imports the engine."""
