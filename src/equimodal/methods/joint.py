"""Plain joint training, the baseline."""
from __future__ import annotations

from ._base import Method
from ._registry import register_method


@register_method("joint")
class Joint(Method):
    """Plain joint training: cross-entropy on the fused logits, no balancing (the baseline).

    Hooks: none beyond the defaults. With a single modality this is unimodal training.
    """

    def __init__(self) -> None:
        super().__init__()
