"""The model store in S3: listing, ranged reads, manifests, the registry, publishing."""
