"""Who may call what: API keys (hashed, compared in constant time), tenants and their
scopes, per-tenant rate limits and cold-load caps, per-tenant accounting."""
