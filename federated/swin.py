"""The Swin Transformer trunk (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", 2021) for the ReID networks of ``backbones``.

Images are cut into 4x4 patches, embedded, and passed through four stages of transformer blocks that attend
within 7x7 windows, every second block with its windows shifted by half a window so information crosses their
borders; between stages a patch-merging layer halves the map and doubles the channels. Inputs of any size are
resized to 224x224 first, the size the window layout (56, 28, 14, 7 patches a side) is built for.

Parameter names follow the Swin authors' release (``patch_embed.proj.weight``, ``layers.0.blocks.1.attn.qkv.weight``,
``layers.2.downsample.reduction.weight``, ``norm.weight``), so their ImageNet files load into ``base`` once the
head and the two index buffers they also store are left out (see ``SWIN_DERIVED_KEYS``). Those buffers are
recomputed here rather than stored, so they are not in this project's state dicts or checkpoints either.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SWIN_LAYOUTS", "SWIN_DERIVED_KEYS", "SwinTrunk"]

INPUT_SIZE = 224
PATCH = 4
WINDOW = 7
HEAD_DIM = 32  # every released variant has 32 channels per head (96/3, 128/4, 192/6)
MLP_RATIO = 4

# name -> (embedding width, blocks per stage)
SWIN_LAYOUTS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "swin_transformer_tiny": (96, (2, 2, 6, 2)),
    "swin_transformer_small": (96, (2, 2, 18, 2)),
    "swin_transformer_base": (128, (2, 2, 18, 2)),
    "swin_transformer_large": (192, (2, 2, 18, 2)),
}
# Keys of a released Swin file that this trunk derives itself or has no place for.
SWIN_DERIVED_KEYS = ("relative_position_index", "attn_mask", "head.weight", "head.bias")


@lru_cache(maxsize=None)
def _relative_index(window: int) -> torch.Tensor:
    """Map each (query, key) pair of a window to its row in the relative-position bias table."""
    # Cached for the process: made outside inference mode even when first asked for in validation, or
    # training could not index with it (an inference tensor cannot be saved for backward).
    with torch.inference_mode(False):
        return _relative_index_of(window)


def _relative_index_of(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2], from 0
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


@lru_cache(maxsize=None)
def _shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """Give the additive mask [windows, N, N] that keeps shifted windows from mixing regions that were not adjacent."""
    with torch.inference_mode(False):  # cached, as _relative_index
        return _shift_mask_of(size, window, shift)


def _shift_mask_of(size: int, window: int, shift: int) -> torch.Tensor:
    region = torch.zeros(size, size)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        region[rows, cols] = label
    windows = _partition(region[None, :, :, None], window).flatten(1)  # [windows, N]
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Cut [B, H, W, C] into windows [B * windows, window, window, C], row by row."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Put windows back together: the inverse of ``_partition``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class PatchEmbed(nn.Module):
    """Resize images to 224x224, cut them into 4x4 patches and embed each one: [B, 3, H, W] -> [B, 56, 56, C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Here, not in the trunk: FedSTIL traces the trunk with FX, which cannot branch on a traced shape.
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per relative position and head."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        count, tokens, dim = x.shape  # count = batch * windows
        q, k, v = self.qkv(x).view(count, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        index = _relative_index(self.window).to(x.device)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1)  # [heads, N, N]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            windows = mask.shape[0]
            shape = (count // windows, windows, self.heads, tokens, -1)
            bias = bias[None] + mask[:, None]  # [windows, heads, N, N], the same for every image
            out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape), attn_mask=bias)
        return self.proj(out.reshape(count, self.heads, tokens, -1).transpose(1, 2).reshape(count, tokens, dim))


class Mlp(nn.Module):
    """The block's two-layer perceptron, four times wider inside."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One transformer block over a [B, H, W, C] map: (shifted) window attention, then the MLP, each residual."""

    def __init__(self, dim: int, heads: int, size: int, shift: bool) -> None:
        super().__init__()
        # A map no larger than a window is one window, and shifting it would change nothing.
        self.window = min(WINDOW, size)
        self.shift = WINDOW // 2 if shift and size > WINDOW else 0
        self.size = size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = _shift_mask(self.size, self.window, self.shift).to(x.device, x.dtype)
        windows = _partition(y, self.window).view(-1, self.window * self.window, c)
        y = _merge(self.attn(windows, mask).view(-1, self.window, self.window, c), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Join each 2x2 group of patches into one with twice the channels: [B, H, W, C] -> [B, H/2, W/2, 2C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The released weights expect this channel order: (even, even), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """The blocks of one stage, then the patch merging that leads to the next (none after the last)."""

    def __init__(self, dim: int, depth: int, size: int, last: bool) -> None:
        super().__init__()
        heads = dim // HEAD_DIM
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, size, shift=i % 2 == 1) for i in range(depth))
        self.downsample = None if last else PatchMerging(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTrunk(nn.Module):
    """The Swin trunk without its ImageNet head: images in, the last stage's normalised map [B, C, 7, 7] out."""

    def __init__(self, width: int, depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        if width % HEAD_DIM:
            raise ValueError(f"model_opts.width: expected a multiple of {HEAD_DIM} for a Swin trunk, found {width}")
        self.patch_embed = PatchEmbed(width)
        size = INPUT_SIZE // PATCH
        stages = []
        for index, depth in enumerate(depths):
            stages.append(SwinStage(width * 2**index, depth, size // 2**index, last=index == len(depths) - 1))
        self.layers = nn.Sequential(*stages)
        self.out_channels = width * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels first on the way out, so the ReID head pools it exactly as it pools a ResNet's map.
        return self.norm(self.layers(self.patch_embed(x))).permute(0, 3, 1, 2)
