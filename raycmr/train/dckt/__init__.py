"""DCKT (Huang & Peng, CVPR 2018): source + target streams, progressive rounds, MMD."""
