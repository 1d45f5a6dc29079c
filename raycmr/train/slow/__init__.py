"""The slow captioning model (Miech et al. 2021) trained by its caption likelihood."""
