"""Training: the LightningModule, its optimiser and schedule, backbone creation, export."""
from .backbone import check_model_name, create_backbone
from .module import PAPER_BACKBONE, ViTClassifier
from .optim import WarmupCosine, build_adamw

__all__ = ["ViTClassifier", "PAPER_BACKBONE", "create_backbone", "check_model_name",
           "WarmupCosine", "build_adamw"]
