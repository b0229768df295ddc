"""FlowUNet: a small convolutional velocity network (ADM / DDPM U-Net) behind FlowTransformer's interface.

On a CPU budget of minutes a U-Net learns the built-in shapes far faster than a DiT of the same cost
(convolutions see local structure from the first step), so the demo uses it. It wraps diffusers'
``UNet2DModel`` and keeps FlowTransformer's call and config names: ``forward(sample, timestep = 1000 t,
class_labels, return_dict, dropout_generator)``, ``num_classes`` with the null class id ``num_classes``
for classifier-free guidance, and label dropout drawn from the trainer's generator.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class FlowUNet(ModelMixin, ConfigMixin):
    """``forward(sample [B, C, H, W], timestep [B], class_labels [B]) -> [B, C, H, W]``.

    Args:
        in_channels, sample_size: input channels and side.
        block_out_channels: channels per resolution (one downsampling between consecutive levels).
        layers_per_block: ResNet blocks per level; attention at the lowest resolution.
        num_classes: 0 = unconditional; else ids ``0..num_classes-1`` plus the null id ``num_classes``.
        class_dropout_prob: training-time probability of replacing a label by the null id.

    ``enable_gradient_checkpointing()`` checkpoints the wrapped ``UNet2DModel``'s blocks (diffusers' own).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int = 32, block_out_channels: tuple = (32, 64, 64),
                 layers_per_block: int = 1, num_classes: int = 0, class_dropout_prob: float = 0.1,
                 norm_num_groups: int = 8):
        super().__init__()
        levels = len(block_out_channels)
        if levels < 2:
            raise ValueError(f"block_out_channels: need at least 2 levels, got {block_out_channels}")
        if sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size: {sample_size} is not divisible by 2^{levels - 1} ({levels} levels)")
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            num_class_embeds=num_classes + 1 if num_classes else None, norm_num_groups=norm_num_groups,
        )

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, dropout_generator: torch.Generator | None = None):
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1).expand(batch)
        labels = None
        if self.config.num_classes:
            if class_labels is None:  # unconditional on a conditional model: the null class
                class_labels = torch.full((batch,), self.null_class_id, dtype=torch.long)
            labels = torch.as_tensor(class_labels, device=sample.device).long().reshape(-1)
            if self.training and self.config.class_dropout_prob > 0:
                device = dropout_generator.device if dropout_generator is not None else sample.device
                drop = torch.rand(labels.shape, generator=dropout_generator, device=device).to(sample.device)
                labels = torch.where(drop < self.config.class_dropout_prob, torch.full_like(labels, self.null_class_id),
                                     labels)
        out = self.unet(sample, timestep, class_labels=labels).sample
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
