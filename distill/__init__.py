"""distill: teacher→student knowledge distillation for image classification."""
__version__ = "0.1.0"
