"""The ingress's logic, free of HTTP and Ray: resolve a model id, alias, split or version, pick its
pool, dispatch, observe.
"""
