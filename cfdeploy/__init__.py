"""cfdeploy: deploy CF-CLIP text-driven StyleGAN2 editors (exact models, export, fast edit CLI)."""

__version__ = "0.1.0"
