"""Image + clinical metadata fusion and its XGBoost baseline."""
