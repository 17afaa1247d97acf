"""The ResNet ``Family``: what the stages need from bottleneck ResNets (registered as
``resnet``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ...data.datasets import dataset_of
from ..bridge import Bridges
from ..family import register_family
from ..weights import read_state_dict
from .config import ResNetModelConfig
from .names import load_resnet_weights
from .net import Bottleneck, ResNet, ResNetShape, imitation_points, point_block_index


def resnet_shape(m: ResNetModelConfig, wide: bool, blocks: list[int] | None = None
                 ) -> ResNetShape:
    """The shape of the thin net (``wide=False``) or of its twin; ``blocks`` overrides the depth."""
    inner_mult = m.widen.inner_mult if wide else 1
    boundary_mult = m.widen.boundary_mult if wide else 1
    return ResNetShape(
        geometry=m.geometry,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        stem_width=m.stem_width * boundary_mult,
        blocks=tuple(blocks or m.blocks),
        inner_widths=tuple(w * inner_mult for w in m.inner_widths),
        boundary_widths=tuple(w * m.expansion * boundary_mult for w in m.inner_widths),
    )


class ResNetFamily:
    """Bottleneck ResNets on images: full linear pairs (P and Q) where boundary widths differ,
    merged into the next block's 1×1 conv and projection shortcut or into the classifier."""

    name = "resnet"
    config_class = ResNetModelConfig
    depth_label = "blocks"
    docs = "docs/resnet.md"
    lift_only = False
    takes_images = True

    def shape(self, m: ResNetModelConfig, wide: bool, depth: list[int] | None = None
              ) -> ResNetShape:
        return resnet_shape(m, wide, depth)

    def shape_from_meta(self, fields: dict) -> ResNetShape:
        # Saved meta went through pickle or JSON, which may turn the tuples into lists.
        return ResNetShape(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in fields.items()})

    def build(self, shape: ResNetShape) -> ResNet:
        return ResNet(shape)

    def thin_depth(self, m: ResNetModelConfig) -> list[int]:
        return m.blocks

    def deeper_depth(self, cfg: Config) -> list[int]:
        return cfg.compare.deeper_blocks

    def imitation_points(self, model: ResNet, m: ResNetModelConfig) -> list[str]:
        return imitation_points(model, m.imitation_points)

    def point_index(self, model: ResNet, point: str) -> int:
        return point_block_index(model, point)

    def boundary_width(self, model: ResNet, point: str) -> int:
        block = model.blocks()[point_block_index(model, point)][1]
        if isinstance(block, Bottleneck):
            return block.conv3.out_channels
        raise ValueError(f"imitation point {point!r} is not the output of a bottleneck block")

    @torch.no_grad()
    def merge_pairs(self, thin: ResNet, bridges: Bridges, skip: list[str]) -> None:
        """The consumer of a point is the next block (whose first 1×1 conv and projection
        shortcut are both linear in the input: W ← W M) or, after the last block, the
        classifier (W_fc ← W_fc M; average pooling is linear)."""
        blocks = thin.blocks()
        for point in bridges.points:
            if point in skip:
                continue
            m = bridges.pair(point).product()  # (c, c)
            idx = point_block_index(thin, point)
            if idx + 1 < len(blocks):
                nxt = blocks[idx + 1][1]
                if not isinstance(nxt, Bottleneck) or not nxt.has_projection:
                    raise ValueError(
                        f"cannot merge the pair at {point!r}: the next block has an identity "
                        f"shortcut"
                    )
                conv1 = nxt.conv1.weight  # (inner, c, 1, 1)
                conv1.copy_(torch.einsum("ic,cd->id", conv1[:, :, 0, 0], m)[:, :, None, None])
                proj = nxt.shortcut[0].weight  # (out, c, 1, 1)
                proj.copy_(torch.einsum("oc,cd->od", proj[:, :, 0, 0], m)[:, :, None, None])
            else:
                thin.fc.weight.copy_(thin.fc.weight @ m)  # (classes, c) @ (c, c)

    def task(self, cfg: Config):
        from .task import ImageTask  # the task imports the stages' shared task code

        return ImageTask(cfg)

    @torch.no_grad()
    def init_head(self, cfg: Config, thin: ResNet, wide: nn.Module, bridges: Bridges | None,
                  last_point: str) -> str:
        """Give the thin net the wide net's classifier when its last point imitated the wide
        output.

        The thin net's last features imitate the wide net's (through P when widths differ), so
        the wide classifier, composed with P, reads them directly: W_thin = W_wide P,
        b_thin = b_wide. Only valid when the last imitation point is the last block; else the
        head stays as is.
        """
        last_block = len(thin.blocks()) - 1
        if cfg.imitate.init_head != "wide" or point_block_index(thin, last_point) != last_block:
            return "random"
        weight, bias = wide.head()  # (classes, C), (classes,)
        weight = weight.to(thin.fc.weight.device)
        if bridges is not None:
            weight = weight @ bridges.pair(last_point).lift  # (classes, C) @ (C, c)
        thin.fc.weight.copy_(weight)
        thin.fc.bias.copy_(bias)
        return "wide"

    def load_weights(self, model: ResNet, path: Path) -> None:
        """A state dict in our, torchvision's or timm's names (``names.py``)."""
        load_resnet_weights(model, read_state_dict(Path(path)))

    def synthetic_batch(self, cfg: Config, batch_size: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, C, side, side) normalised-like noise; y: (B,) class indices
        m = cfg.model
        side = dataset_of(cfg).image_side(cfg)
        x = torch.randn(batch_size, m.in_channels, side, side, generator=generator)
        return x, torch.randint(0, m.num_classes, (batch_size,), generator=generator)

    def export(self, model: ResNet, out: Path, tokenizer: Path | None) -> list[Path]:
        from ...export_hf import ExportError  # export_hf finds its writer through the family
        from .export import export_resnet

        if tokenizer is not None:
            raise ExportError("--tokenizer goes with a BERT; this is a ResNet")
        return export_resnet(model, out)


register_family(ResNetFamily.name, ResNetFamily())
