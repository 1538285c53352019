"""generators"""
from .gpt import GPTModel

__all__ = ["GPTModel"]
