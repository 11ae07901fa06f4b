"""prime-scale: pretraining for partial-masking discrete diffusion language models (MDM-Prime)."""

__version__ = "0.1.0"
