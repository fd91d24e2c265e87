"""The fedjewel coordinator: global model versions, rounds, node registry, catalog."""
