"""Retrieval: embedding stores, ScaNN indexes and private k-NN over a Poisson subsample."""
