"""The two stages: extract (stage one) and fit / evaluate / predict (stage two)."""
