"""A fedjewel regional node: private event store, local trainer, storefront recommendations."""
