"""tokenizers_vq."""
