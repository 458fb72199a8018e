"""Operator tools, not imported by applications: the local cluster (``clusterq dev``),
server processes, failover drills, benchmarks and the worker processes they start."""
