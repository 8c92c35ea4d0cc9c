"""From the store to a servable model: RAM and disk tiers, verified buffers, modules."""
