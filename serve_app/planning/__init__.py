"""Capacity planning: replay real or synthetic traffic through the real cache and router code.

trace.py (traces: the ingress access log, a Zipf over the registry's models, load times),
replay.py (the replay over N replicas of `ModelCache`), capacity.py (the plan: grids of
replica counts and budgets, memory for a target hit rate, consolidation ratio).
"""
