"""The Kubernetes adapter: CRD, manifest builders, API access and kopf handlers."""
