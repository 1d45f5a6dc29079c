"""raycmr: Ray-native training and serving of cross-modal (image <-> text) retrieval models."""

from raycmr.ops import extensions_dir as _extensions_dir

__version__ = "0.1.0"

# DeepSpeed's JIT-built CPU op lives in this environment, for the driver and Ray workers alike.
_extensions_dir()
