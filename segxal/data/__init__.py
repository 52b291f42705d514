"""Datasets: manifests (Arrow tables) and torch Datasets over them."""
