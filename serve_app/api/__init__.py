"""HTTP: the native routes, the Open Inference Protocol v2 routes and codec, the management routes,
and a small client of a running fleet.
"""
