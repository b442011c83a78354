"""Every built-in method: importing this module registers each one's config and method class (each registers
where it is defined). What reads configs or recipes by name imports it: ``compress.Config`` and ``compress.recipe``."""

from compress import factorize, prune, quantize  # noqa: F401  (registered as they are defined)
from compress.quantize import int8_stage  # noqa: F401  (lowering to INT8, above the container)
