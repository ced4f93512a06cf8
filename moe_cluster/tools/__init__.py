"""Tools around the serving system: `moe-cluster bench` (bench*), the KubeRay manifest renderer
(k8s), and free local ports for tests, scripts and benchmarks (ports)."""
