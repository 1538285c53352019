"""Stage two: generators over tokenizer outputs (LlamaGen-style GPT over codes, DiT/SiT flow denoiser over latents)."""
from .dit import DiTModel
from .gpt import GPTModel

__all__ = ["GPTModel", "DiTModel"]
