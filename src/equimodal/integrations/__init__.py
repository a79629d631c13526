"""Adapters to other training frameworks. Each lives in its own module and imports its framework
only there, so ``import equimodal`` never needs them:

- ``equimodal.integrations.lightning``: ``EquimodalCallback`` for Lightning 2.x
  (``pip install "equimodal[lightning]"``).

Hugging Face Accelerate needs no adapter: see ``examples/accelerate_ogm_ge.py``.
"""
