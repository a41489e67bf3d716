"""DeepCluster and the expert's naming of clusters."""
