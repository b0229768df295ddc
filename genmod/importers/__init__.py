"""Importers of released checkpoints: ``genmod import KIND CHECKPOINT [...] --out PIPELINE_DIR``.

Each importer maps an official checkpoint's tensors onto a genmod model and writes an ordinary
genmod pipeline folder (safetensors + ``model_index.json``) that ``genmod sample``, ``genmod eval``,
``XPipeline.from_pretrained`` and fine-tuning use like any other. The rules every importer follows
live in :mod:`genmod.importers.files`: pickled ``.pt/.pth`` files are read with
``torch.load(weights_only=True)`` only, a hub id downloads through ``huggingface_hub`` only when
online, a checkpoint of the wrong model is one line, and nothing half-written stays at ``--out``.

The table below names each KIND's ``"module:function"``; a function takes the parsed arguments
(``checkpoints``: list of paths or hub ids, ``out``, plus its own options) and returns the folder.
"""

from __future__ import annotations

# KIND -> ("module:function", one-line help). Importers register here, nowhere else.
IMPORTERS: dict[str, tuple[str, str]] = {
    "mar-kl16": ("genmod.importers.mar_kl16:run", "MAR's KL-16 VAE (LTH14/mar kl16.ckpt, also CausalFusion's) -> a "
                 "diffusers AutoencoderKL tokenizer folder (scaling_factor 0.2325)"),
    "causalfusion": ("genmod.importers.causalfusion:run", "CausalFusion (causalfusion/causalfusion) .pt + --vae "
                     "tokenizer folder (MAR KL-16) -> CausalFusionPipeline"),
    "sit": ("genmod.importers.sit:run", "SiT (willisma/SiT) .pt + a diffusers AutoencoderKL -> FlowMatchingPipeline"),
    "var": ("genmod.importers.var:run", "VAR (FoundationVision/VAR): VAE_CKPT VAR_CKPT, e.g. "
            "vae_ch160v4096z32.pth var_d16.pth -> VARPipeline"),
}

__all__ = ["IMPORTERS"]
