"""onestep: distill multi-step diffusion and flow models into one- and few-step generators."""
__version__ = "0.1.0"
