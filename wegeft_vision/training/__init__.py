"""Training: the LightningModule, its optimiser and schedule, backbone creation, export."""
from .backbone import check_model_name, create_backbone
from .module import PAPER_BACKBONE, ViTClassifier
from .optim import build_adamw, warmup_cosine

__all__ = ["ViTClassifier", "PAPER_BACKBONE", "create_backbone", "check_model_name",
           "build_adamw", "warmup_cosine"]
