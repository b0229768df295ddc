"""Shared network parts for every family: attention + KV cache, block-id masks, embeddings, layers."""

from genmod.nn.attention import ATTENTION_BACKENDS, Attention, KVCache, attention, check_backend, make_kv_caches
from genmod.nn.checkpointing import checkpoint_block
from genmod.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    apply_rope,
    grid_positions,
    patchify,
    rope_frequencies,
    sincos_1d,
    sincos_2d,
    sincos_3d,
    split_head_dim,
    timestep_embedding,
    unpatchify,
)
from genmod.nn.layers import (
    AdaLNZeroBlock,
    CausalBlock,
    DiffusionHead,
    DropPath,
    FinalLayer,
    LayerNormNoAffine,
    Mlp,
    PreNormBlock,
    SwiGLU,
    drop_path,
    make_mlp,
    modulate,
    swiglu_hidden_size,
    xavier_init_,
)
from genmod.nn.masks import (
    CAUSALFUSION_RULES,
    block_ids_from_sizes,
    block_mask,
    causal_mask,
    causalfusion_layout,
    causalfusion_mask,
    mask_from_rules,
    mask_to_bias,
)
from genmod.nn.norms import RMSNorm, make_norm
