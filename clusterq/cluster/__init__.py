"""Where a slot lives and how to reach it: URLs and node clients, the fast wire path,
the cluster map (topology) and its changes, and routing of every call to its slot's
master (with the retry decisions in one pure module, :mod:`clusterq.cluster.routing`)."""
