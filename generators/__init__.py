"""Stage two: generators over tokenizer outputs (LlamaGen-style GPT over codes, DiT/SiT flow denoiser over latents)."""
from vfmtok.generators.dit import DiTModel
from vfmtok.generators.gpt import GPTModel

__all__ = ["GPTModel", "DiTModel"]
