"""nodes domain."""
