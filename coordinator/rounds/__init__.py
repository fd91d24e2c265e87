"""rounds domain."""
