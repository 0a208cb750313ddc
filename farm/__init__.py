"""farm: a distributed render farm for Stable Diffusion.

This package is the vocabulary every side shares. It never imports torch,
diffusers or transformers, so a dispatcher or CLI host needs no GPU stack.
"""

__version__ = "0.1.0"
