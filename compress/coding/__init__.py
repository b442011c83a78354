"""Entropy coding and the .cpz container."""
from compress.coding.container import load_cpz, save_cpz

__all__ = ["load_cpz", "save_cpz"]
