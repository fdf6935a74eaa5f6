"""ktray: self-supervised learning with knowledge transfer (Noroozi et al., CVPR 2018) on Ray."""

__version__ = "0.1.0"
