"""From the store to a servable model: host-RAM and disk tiers, verified buffers, tensors, modules.
"""
