"""Encoders, fusions and the multimodal wrapper (imports nothing from methods/ or train/)."""
from .encoders import ENCODERS, MLPEncoder, SmallCNN
from .fusion import FUSIONS, ConcatFusion, FiLMFusion, Fusion, GatedFusion, LateFusion, SumFusion
from .resnet import AudioResNet18, VisualResNet18
from .multimodal import ESTIMATORS, ModelOutput, MultimodalModel

__all__ = ["AudioResNet18", "VisualResNet18", "ENCODERS", "MLPEncoder", "SmallCNN", "FUSIONS", "Fusion", "ConcatFusion", "SumFusion",
           "LateFusion", "FiLMFusion", "GatedFusion", "ESTIMATORS", "ModelOutput", "MultimodalModel"]
