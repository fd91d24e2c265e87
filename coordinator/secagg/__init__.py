"""Secure aggregation: key exchange through the coordinator, masked sums, dropout recovery."""
