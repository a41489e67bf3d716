"""The similar-patient recommender: building its index and evaluating it."""
