"""dprdm-jax: differentially private retrieval-augmented diffusion (DP-RDM) in JAX/Flax."""

__version__ = "0.1.0"
