"""What the coordinator and the regional nodes must agree on."""
