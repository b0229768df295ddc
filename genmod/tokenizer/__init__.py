"""The tokenizer training family (``genmod train tokenizer``) over the ``tokenizers_vq`` models.

``TokenizerConfig`` (config.py, flags and the model they describe), ``TokenizerFamily`` (family.py:
losses, discriminator, previews, after-training evaluation), ``evaluate_tokenizer`` (evaluation.py),
codebook statistics (codebook.py) and ``genmod eval-tokenizer`` (cli.py).
"""

from genmod.tokenizer.codebook import code_histograms, token_rate, usage_metrics
from genmod.tokenizer.config import TokenizerConfig, build_tokenizer, resolved_cosine
from genmod.tokenizer.evaluation import (evaluate_audio_tokenizer, evaluate_image_tokenizer, evaluate_tokenizer,
                                         load_eval_dataset)
from genmod.tokenizer.family import TokenizerFamily

__all__ = ["TokenizerConfig", "TokenizerFamily", "build_tokenizer", "resolved_cosine", "evaluate_tokenizer",
           "evaluate_image_tokenizer", "evaluate_audio_tokenizer", "load_eval_dataset", "code_histograms",
           "usage_metrics", "token_rate"]
