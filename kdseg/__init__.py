"""kdseg: knowledge distillation for semantic segmentation (Hydra + smp DeepLabV3+ + MLflow)."""
__version__ = "0.1.0"
