"""Model management across replicas: load, unload, pin, unpin, and the pin store."""
