"""VPT (Jia et al., ECCV 2022), the paper's prompt baseline: learned tokens in the sequence.

``num_tokens`` learned prompts of width ``dim`` sit after the prefix tokens (class token, register
tokens) and before the patch tokens. They enter after the position embedding, so they get none:
they join the first block's input, where the WeGeFT authors' pre-hook on block 0 puts them
(savadikarc/gift ``gift/prompt_wrapper.py``). Deep: every block reads prompts of its own in
place of the previous block's prompt outputs; shallow (``deep=False``): prompts enter once and
flow through. After the last block the prompt positions are gone, so what follows the blocks
(final norm, pooling, head) reads the sequence it read before: average pooling never averages
prompts in.

VPT-deep cannot fold into weights. VPT-shallow is exactly a timm ``VisionTransformer`` with
``num_tokens`` more register tokens whose position-embedding rows are zero: merging turns the
model into that plain timm model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from timm.layers import PatchDropout
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from ..errors import UserError
from .base import AdapterConfig, AdapterLayer, register_method
from .model import get_adapter
from .targets import replace_module

PROMPTS_KEY = "prompts"
KEEP_ADAPTED = ("Keep the adapted model instead: the training checkpoint, or the adapter file "
                "(save_adapter, then load_adapter onto the same backbone)")
DEEP_CANNOT_MERGE = ("VPT-deep cannot be folded into the weights: every block reads its own "
                     f"learned prompt tokens, which no plain timm model has. {KEEP_ADAPTED}")


@register_method
@dataclass
class VPTConfig(AdapterConfig):
    """VPT: learned prompt tokens after the prefix tokens, before the patch tokens.

    Initialised as VPT's code: uniform in +-sqrt(6 / (3·patch² + dim)) (Xavier-uniform with the
    patch embedding's fan-in). Trains ``num_tokens x dim`` per prompted block (deep: every block;
    ViT-B/16, 5 tokens: 12 x 5 x 768 = 46,080).

    Args:
        num_tokens: prompts per block.
        deep: new prompts in every block (VPT-deep, as the WeGeFT authors ran it); False puts
            prompts before the first block only (VPT-shallow).
        dropout: dropout on the prompts while training (VPT's VTAB runs: 0.1; the WeGeFT authors:
            none).
    """

    method: ClassVar[str] = "vpt"
    num_tokens: int = 5
    deep: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                or self.num_tokens <= 0:
            raise UserError(f"VPT num_tokens must be a positive int, got {self.num_tokens!r}")
        if not isinstance(self.deep, bool):
            raise UserError(f"VPT deep must be True or False, got {self.deep!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"VPT dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def cannot_merge(self) -> Optional[str]:  # type: ignore[override]
        return DEEP_CANNOT_MERGE if self.deep else None

    def inject(self, model: nn.Module) -> dict[str, nn.Module]:
        check_family(model)
        blocks = list(model.blocks)
        patch_area = math.prod(_pair(model.patch_embed.patch_size))
        reference = next(model.parameters())
        prompts = PromptTokens(len(blocks) if self.deep else 1, self.num_tokens, model.embed_dim,
                               patch_area, self.dropout).to(reference.device, reference.dtype)
        prompts.train(model.training)  # a model put in eval mode keeps its prompts' dropout off
        refusal = None if self.deep else shallow_merge_refusal(model)
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            if self.deep:  # each block inserts its own prompts and drops their outputs
                index, drop = i, True
            elif i in (0, last):  # inserted before the first block, dropped after the last
                index, drop = (0 if i == 0 else None), i == last
            else:
                continue  # a shallow prompt passes through the middle blocks untouched
            wrapper = PromptedBlock(block, prompts, index=index, prefix=model.num_prefix_tokens,
                                    drop=drop, merge_refusal=refusal)
            replace_module(model, f"blocks.{i}", wrapper)
        return {PROMPTS_KEY: prompts}

    def on_unload(self, model: nn.Module, merge: bool) -> None:
        if merge:  # VPT-shallow (deep never merges): its prompts become register tokens
            to_register_tokens(model, get_adapter(model).edits[PROMPTS_KEY].tokens[0])


def _pair(size: Any) -> tuple[int, ...]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def check_family(model: nn.Module) -> None:
    """Refuse a model whose blocks depend on the number of tokens, naming the family and why."""
    name = type(model).__name__
    why = None
    if isinstance(model, VisionTransformerRelPos):
        why = ("its relative-position embedding (vit_relpos_*) is computed for the patch grid "
               "plus the prefix tokens, a fixed token count that prompts would break")
    elif isinstance(model, Eva) and model.rope is not None:
        why = ("its rotary position embedding (EVA02 RoPE) rotates every token after the prefix "
               "tokens as a patch of the grid, so a prompt has no place in it")
    elif isinstance(model, Beit) and (model.rel_pos_bias is not None or any(
            getattr(block.attn, "relative_position_bias_table", None) is not None
            for block in model.blocks)):
        why = ("its relative position bias (BEiT) is a table over the patch grid plus the class "
               "token, a fixed token count that prompts would break")
    elif not isinstance(model, (VisionTransformer, Eva, Beit)):
        why = ("VPT serves timm's VisionTransformer family (ViT, DeiT, DINOv2, CLIP, SigLIP, "
               "FlexiViT), Eva without RoPE and Beit without relative position bias")
    if why is not None:
        raise UserError(f"VPT cannot adapt a {name}: {why}")


class PromptTokens(nn.Module):
    """The learned prompts, ``tokens[i]``: the (num_tokens, dim) prompts of prompted block i."""

    def __init__(self, blocks: int, num_tokens: int, dim: int, patch_area: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(blocks, num_tokens, dim))
        # VPT's Xavier-uniform bound: fan-in of the patch embedding (3 channels x patch area)
        bound = math.sqrt(6.0 / (3 * patch_area + dim))
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def forward(self, index: int, batch: int) -> torch.Tensor:
        """Block ``index``'s prompts for a batch, dropped out per sample as VPT's code does."""
        return self.dropout(self.tokens[index].expand(batch, -1, -1))


class PromptedBlock(AdapterLayer):
    """A timm block (``base_layer``) that inserts prompts into its input, drops them from its
    output, or both.

    Dropping a deep block's prompt outputs right away is VPT's replacement of them by the next
    block's prompts, and gives every deep block's output the model's own token layout (so
    ``forward_intermediates`` reads it as without prompts). There is nothing to fold into a
    block: merged, it computes the same (VPT-shallow's prompts become register tokens when the
    adapter is unloaded, :meth:`VPTConfig.on_unload`).

    Args:
        base_layer: the block, unchanged.
        prompts: the model's :class:`PromptTokens` (referred to, not registered here).
        index: insert ``prompts.tokens[index]`` after the ``prefix`` tokens; None: the input
            carries prompts already (VPT-shallow after the first block).
        prefix: the model's prefix tokens (class and register tokens) before the prompts.
        drop: drop the prompt positions from the output.
        merge_refusal: why merging must refuse (None: it merges).
    """

    def __init__(self, base_layer: nn.Module, prompts: PromptTokens, index: Optional[int],
                 prefix: int, drop: bool, merge_refusal: Optional[str] = None) -> None:
        super().__init__(base_layer)
        self.edits: dict[str, PromptTokens] = {PROMPTS_KEY: prompts}  # deliberately not registered
        self.index, self.prefix, self.drop = index, prefix, drop
        self.merge_refusal = merge_refusal

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.check_not_training()
        prompts = self.edits[PROMPTS_KEY]
        start = self.prefix
        if self.index is not None:
            tokens = prompts(self.index, x.shape[0])
            x = torch.cat([x[:, :start], tokens, x[:, start:]], dim=1)
        x = self.base_layer(x, *args, **kwargs)
        if self.drop:
            x = torch.cat([x[:, :start], x[:, start + prompts.num_tokens:]], dim=1)
        return x

    def merge(self) -> None:
        if self.merge_refusal is not None:
            raise UserError(self.merge_refusal)
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def extra_repr(self) -> str:
        inserted = "carried" if self.index is None else f"tokens[{self.index}]"
        return (f"prompts={inserted}, prefix={self.prefix}, drop={self.drop}"
                + (", merged" if self.merged else ""))


def shallow_merge_refusal(model: nn.Module) -> Optional[str]:
    """Why VPT-shallow on this model is not exactly a timm ViT with more register tokens (None:
    it is, and merging turns it into one)."""
    name = type(model).__name__
    why = None
    if not isinstance(model, VisionTransformer) or \
            type(model)._pos_embed is not VisionTransformer._pos_embed:
        why = (f"{name} does not place register tokens as timm's VisionTransformer does (class "
               "token, registers, patches)")
    elif not isinstance(model.norm_pre, nn.Identity):
        why = (f"{name} normalises its input tokens (norm_pre, e.g. CLIP): register tokens pass "
               "through it, prompts do not")
    elif model.pool_include_prefix:
        why = f"{name} pools over its prefix tokens too, so register tokens would be pooled in"
    return None if why is None else (f"VPT-shallow cannot become a plain timm model: {why}. "
                                     f"{KEEP_ADAPTED}")


@torch.no_grad()
def to_register_tokens(model: VisionTransformer, prompts: torch.Tensor) -> None:
    """Turn ``model`` in place into the timm ViT that VPT-shallow with ``prompts`` (p, dim) is:
    the prompts appended to its register tokens, with zero position-embedding rows where its
    prefix tokens have rows (``no_embed_class=False``)."""
    count = prompts.shape[0]
    new = prompts.detach().to(model.patch_embed.proj.weight.dtype)[None]
    registers = new if model.reg_token is None else torch.cat([model.reg_token.detach(), new], 1)
    if model.pos_embed is not None and not model.no_embed_class:
        pos, at = model.pos_embed.detach(), model.num_prefix_tokens
        zeros = pos.new_zeros(1, count, pos.shape[-1])
        model.pos_embed = nn.Parameter(torch.cat([pos[:, :at], zeros, pos[:, at:]], dim=1))
    model.reg_token = nn.Parameter(registers)
    model.num_reg_tokens += count
    model.num_prefix_tokens += count
    if isinstance(model.patch_drop, PatchDropout):  # it keeps the prefix tokens: now more
        model.patch_drop.num_prefix_tokens = model.num_prefix_tokens
    # timm registers cls_token, reg_token, pos_embed in this order: keep its state-dict order
    if "pos_embed" in model._parameters:
        model._parameters["pos_embed"] = model._parameters.pop("pos_embed")
