"""HTTP faces of the deployments: shared dispatch (common.py), the router's endpoints, OIP v2, bearer auth."""
