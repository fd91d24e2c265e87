"""models registry domain."""
