"""gwtn_dist: "Go Wide, Then Narrow" — train deep thin nets by imitating a wide twin."""

__version__ = "0.1.0"
