"""kdrun: config-driven knowledge-distillation experiments."""

__version__ = "0.1.0"
