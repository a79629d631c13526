"""equimodal: balanced multimodal learning (OGM-GE done right, its alternatives and peers).

The public names: the method contract (``Method``, ``Stage``, ``build_method``, ``register_method``),
the model contract (``ModelOutput``, ``MultimodalModel``), your own data and model
(``register_dataset``, ``register_model``), and ``diagnose`` / ``bench`` (``equimodal.api``).
The reference is docs/api.md; every method is described in docs/methods.md.
"""
from .api import BenchResult, bench, diagnose, evaluate_run
from .data import register_dataset
from .methods import Method, Stage, available_methods, build_method, register_method
from .models import ModelOutput, MultimodalModel
from .models.factory import register_model

__version__ = "0.1.0"
__all__ = ["BenchResult", "Method", "Stage", "available_methods", "bench", "build_method", "diagnose", "evaluate_run",
           "register_dataset", "register_method", "register_model", "ModelOutput", "MultimodalModel", "__version__"]
