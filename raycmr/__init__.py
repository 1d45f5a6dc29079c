"""raycmr: Ray-native training and serving of cross-modal (image <-> text) retrieval models."""

__version__ = "0.1.0"
