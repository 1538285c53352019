"""Training of every stage on the shared trainer, extraction of codes and latents for stage two (the top layer,
with the command line)."""
