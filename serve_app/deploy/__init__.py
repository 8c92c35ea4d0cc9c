"""What operators deploy: the KubeRay `RayService` rendered from config.yaml (kuberay.py)."""
