"""Building blocks of learning: the training loop, inference, retrieval, explainers, metrics. No stage lives here."""
