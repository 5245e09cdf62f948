"""JAX users' entry point: ``packq.jax.load`` puts a quantized checkpoint straight into (sharded) jax.Arrays.

Importing this module imports JAX; ``import packq`` does not.
"""

from packq.checkpoint.jax_loader import LAYOUTS, load

__all__ = ["LAYOUTS", "load"]
