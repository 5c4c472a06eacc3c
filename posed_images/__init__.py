"""Posed images on disk: the formats users already have (formats.py), the 3D model trained on them
(dataset.py), and real meshes with an exact hidden part written in one of those formats (meshes.py)."""
