"""BASNet salient-object segmentation, trained and served at cluster scale on Ray.

The library imports without Ray; the Ray parts live in ``basnet.ray_*`` modules and ``jobs/``.
"""

__version__ = "0.1.0"
