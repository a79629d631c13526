"""equimodal: balanced multimodal learning (OGM-GE done right, its alternatives and peers)."""
from .methods import Method, Stage, available_methods, build_method, register_method
from .models import ModelOutput, MultimodalModel

__version__ = "0.1.0"
__all__ = ["Method", "Stage", "available_methods", "build_method", "register_method",
           "ModelOutput", "MultimodalModel", "__version__"]
