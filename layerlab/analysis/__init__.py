"""Instruments that measure trained networks: layer statistics, CKA, LSC landscapes, robustness."""
