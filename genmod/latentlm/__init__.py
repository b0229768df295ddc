"""LatentLM: multimodal latent language modeling with next-token diffusion (Sun et al. 2024).

One causal transformer over text bytes / class ids and sigma-VAE latents: ``LatentLMTransformer``
(transformer.py), the vocabulary and sequence layouts (text.py), KV-cached sampling (sampling.py),
the training family ``latentlm`` (family.py) and ``LatentLMPipeline`` (pipeline.py).
"""

from genmod.latentlm.text import LatentLMTokenizer, pack_sequences
from genmod.latentlm.transformer import LatentLMOutput, LatentLMTransformer

__all__ = ["LatentLMTransformer", "LatentLMOutput", "LatentLMTokenizer", "pack_sequences"]
