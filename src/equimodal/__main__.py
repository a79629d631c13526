"""``python -m equimodal`` (and ``torchrun -m equimodal``) runs the command-line interface."""
import sys

from .cli import console

sys.exit(console())
