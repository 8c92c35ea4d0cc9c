"""Thin Ray Serve deployments over the fleetserve core (`serve_app`)."""
