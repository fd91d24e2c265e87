"""Regional insights: aggregate statistics pushed by nodes (federated analytics)."""
