"""The byte-budgeted model cache of one replica and its eviction policies."""
