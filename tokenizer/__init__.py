"""Stage one: tokenizers on a frozen vision foundation model."""
