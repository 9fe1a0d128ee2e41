"""trl_distill: distill a large teacher LLM into a small student, as a drop-in TRL extension."""
__version__ = "0.1.0.dev0"
