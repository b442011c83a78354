"""The .cpz container: one compact, checked file holding a compressed model (its architecture as data, its
tensors entropy coded by ``compress.coding``)."""

from compress.cpz.container import load_cpz, save_cpz

__all__ = ["load_cpz", "save_cpz"]
