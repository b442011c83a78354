"""Entropy coding and the .cpz container."""
from .container import load_cpz, save_cpz

__all__ = ["load_cpz", "save_cpz"]
