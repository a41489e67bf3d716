"""The expert's step: contact sheets of DeepCluster's clusters (:mod:`msk.core.models.deepcluster`), naming them,
and the review app."""
