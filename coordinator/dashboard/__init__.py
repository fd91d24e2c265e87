"""The operator dashboard: one HTML page, hand-written JS, and a read-only JSON summary."""
