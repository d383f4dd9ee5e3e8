"""edgegen: low-latency serving of generative and classic models on edge nodes."""

__version__ = "0.1.0"
