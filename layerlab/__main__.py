"""``python -m layerlab`` (also what ``torchrun -m layerlab`` runs)."""

from layerlab.cli import main

main()
