"""The WeGeFT linear layer as functions: the plain form (the reference) and the fast path.

Both compute y = W(x + s·phi(psi(x))) + b, edited per q/k/v row block when the edits name rows.
The plain form is three autograd ops per edit; the fast path is one ``autograd.Function`` that

* saves only the layer input (or nothing, see *recompute*) and the r-dim h = psi(x);
* picks per layer the cheaper of two equal algebraic forms: the *input form*
  u = x + s·h·phi^T, y = u·W^T + b (one frozen matmul on the edited input, the add fused into
  ``addmm``), or the *output form* y = x·W^T + b + h·(s·W·phi)^T, a LoRA-like product whose
  factor B = s·W·phi costs d_out·d_in·r once per step, whatever the batch. The output form wins
  when d_in > d_out (fc2) at ViT token counts, and serves q/k/v parts without one frozen matmul per
  part and a ``cat``;
* in backward never forms dW, fuses the two contributions to dL/dx into one ``addmm``, and skips
  the frozen d_out x d_in matmul when x needs no gradient.

*Recompute*: the input of an adapted layer is usually a tensor the network keeps anyway in
another form: fc2's input is GELU(z) and GELU saves z; qkv's and fc1's inputs are LayerNorm
outputs and LayerNorm saves its input and statistics; attn.proj's input is a reshaped copy of the
attention output, which scaled-dot-product attention saves. With ``recompute=True`` the layer saves
those tensors (no new memory) and rebuilds x in backward (one elementwise pass).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

_PLAIN = False


@contextlib.contextmanager
def plain_form() -> Iterator[None]:
    """Within this context WeGeFT layers run the plain autograd form (for tests and benchmarks)."""
    global _PLAIN
    previous, _PLAIN = _PLAIN, True
    try:
        yield
    finally:
        _PLAIN = previous


def plain_form_enabled() -> bool:
    return _PLAIN


@dataclass(frozen=True)
class EditSpec:
    """One generator applied to the output rows [start, stop) of W (all rows when ``rows`` is None).

    ``psi``: r x d_in, ``phi``: d_in x r (the ``nn.Linear`` weights), ``scale``: s.
    """

    psi: torch.Tensor
    phi: torch.Tensor
    scale: float = 1.0
    rows: Optional[tuple[int, int]] = None


def wegeft_linear_plain(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        edits: Sequence[EditSpec]) -> torch.Tensor:
    """The representation form with plain autograd ops: the reference the fast path must equal."""
    def edited(edit: EditSpec) -> torch.Tensor:
        delta = F.linear(F.linear(x, edit.psi), edit.phi)
        return x + (delta if edit.scale == 1.0 else delta * edit.scale)

    if len(edits) == 1 and edits[0].rows is None:
        return F.linear(edited(edits[0]), weight, bias)
    by_rows = {edit.rows: edit for edit in edits}
    outputs = []
    for rows in _row_blocks(weight.shape[0], [e.rows for e in edits]):
        edit = by_rows.get(rows)
        part_input = x if edit is None else edited(edit)
        sl = slice(*rows)
        outputs.append(F.linear(part_input, weight[sl], None if bias is None else bias[sl]))
    return torch.cat(outputs, dim=-1)


def _row_blocks(d_out: int, rows: list[Optional[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Consecutive row blocks covering [0, d_out): the edited ones and the gaps between them."""
    blocks, start = [], 0
    for begin, end in sorted(r for r in rows if r is not None):
        if begin > start:
            blocks.append((start, begin))
        blocks.append((begin, end))
        start = end
    if start < d_out:
        blocks.append((start, d_out))
    return blocks


# --- recompute: rebuild x from tensors that the producing op saved anyway ------------------------

# A recipe: rebuild(*sources) gives x; every source is sliced with x along dim 0, so x can be
# rebuilt a few samples at a time (see _psi_grad).
Rebuild = Callable[..., torch.Tensor]
# Rebuilt in chunks of about this many elements: small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 18


def _gelu_recipe(node: torch.autograd.graph.Node, x: torch.Tensor
                 ) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    z = node._saved_self
    approximate = node._saved_approximate
    if z.shape != x.shape or z.dtype != x.dtype:
        return None
    return (lambda z: F.gelu(z, approximate=approximate)), (z,)


def _layer_norm_recipe(node: torch.autograd.graph.Node, x: torch.Tensor
                       ) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    source, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
    weight, bias = node._saved_weight, node._saved_bias
    if source.shape != x.shape or source.dtype != x.dtype or weight is None or bias is None:
        return None

    def rebuild(source: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        # LayerNorm accumulates in float32 at least; so does the rebuild, then rounds like it.
        acc = torch.promote_types(source.dtype, torch.float32)
        out = torch.addcmul(bias.to(acc), (source.to(acc) - mean) * rstd, weight.to(acc))
        return out.to(source.dtype)

    return rebuild, (source, mean, rstd)


def _saved_output_recipe(node: torch.autograd.graph.Node, x: torch.Tensor
                         ) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    """x = out.transpose(a, b).reshape(shape) where ``out`` is an op's saved output (attention)."""
    if type(node).__name__ not in ("UnsafeViewBackward0", "ViewBackward0"):
        return None
    view_input_shape = tuple(node._saved_self_sym_sizes)
    node, _ = node.next_functions[0]
    if node is not None and type(node).__name__ == "CloneBackward0":
        node, _ = node.next_functions[0]
    if node is None or type(node).__name__ != "TransposeBackward0":
        return None
    dims = (node._saved_dim0, node._saved_dim1)
    producer, index = node.next_functions[0]
    if producer is None or index != 0 or not hasattr(producer, "_saved_output"):
        return None
    out = producer._saved_output
    shape = tuple(x.shape)
    if out.dtype != x.dtype or tuple(out.transpose(*dims).shape) != view_input_shape:
        return None
    return (lambda out: out.transpose(*dims).reshape(out.shape[0], *shape[1:])), (out,)


_RECIPES = {
    "GeluBackward0": _gelu_recipe,
    "NativeLayerNormBackward0": _layer_norm_recipe,
    "UnsafeViewBackward0": _saved_output_recipe,
    "ViewBackward0": _saved_output_recipe,
}


def _saved_tensor_hooks_active() -> bool:
    # Hooks (offloading, non-reentrant checkpointing) may move or drop what a node saved; reading
    # it back during forward would then cost a copy or a recomputation, so recompute stands down.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


def input_recipe(x: torch.Tensor) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    """How to rebuild ``x`` in backward from tensors its producer already saved, if known."""
    # Compiled graphs have no grad_fn to read; the compiler's partitioner recomputes by itself.
    if torch.compiler.is_compiling() or _saved_tensor_hooks_active():
        return None
    node = x.grad_fn
    if node is None:
        return None
    recipe = _RECIPES.get(type(node).__name__)
    return None if recipe is None else recipe(node, x)


# --- the fast path --------------------------------------------------------------------------------

def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def use_output_form(tokens: int, d_in: int, d_out: int, whole: bool) -> bool:
    """Whether y = xW^T + b + h(sW·phi)^T costs fewer multiply-adds than the input form.

    Input form: 6·N·r·d_in; output form: 3·N·r·(d_in + d_out) + 2·d_in·d_out·r (r cancels). Row
    blocks (q/k/v parts) always take the output form: it needs one frozen matmul, not one per part.
    """
    return not whole or 3 * tokens * (d_in + d_out) + 2 * d_in * d_out < 6 * tokens * d_in


class _WeGeFTLinearFunction(torch.autograd.Function):
    """Inputs: x, W, b, then (psi, phi) per edit. Non-tensor arguments describe the edits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                scales: tuple[float, ...], rows: tuple[Optional[tuple[int, int]], ...],
                output_form: bool, recipe: Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]],
                *factors: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        if autocast and x2.dtype == torch.float32:
            # Cast once and keep the cast copy, as autocast's F.linear would for psi's input.
            x2 = x2.to(torch.get_autocast_dtype(device_type))
        psis, phis = factors[0::2], factors[1::2]
        psi_all = psis[0] if len(psis) == 1 else torch.cat(psis)
        h = torch.mm(x2, psi_all.t())
        if output_form:
            y = F.linear(x2, weight, bias)
            offset = 0
            for phi, scale, rw in zip(phis, scales, rows):
                w_rows = weight if rw is None else weight[rw[0]:rw[1]]
                b_fac = _scaled(torch.mm(w_rows, phi), scale)
                y_rows = y if rw is None else y[:, rw[0]:rw[1]]
                y_rows.addmm_(h[:, offset:offset + phi.shape[1]], b_fac.t())
                offset += phi.shape[1]
        else:
            u = torch.addmm(x2, h, phis[0].t(), alpha=scales[0])
            y = F.linear(u, weight, bias)
        sources = (x2,) if recipe is None else recipe[1]
        # B = sW·phi is rebuilt in backward rather than kept: saved memory stays at x and h.
        ctx.save_for_backward(weight, h, *factors, *sources)
        ctx.meta = (len(factors), scales, rows, output_form, x.dtype, d_in,
                    None if recipe is None else recipe[0], device_type, autocast,
                    torch.get_autocast_dtype(device_type))
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (n_factors, scales, rows, output_form, x_dtype, d_in, rebuild, device_type,
         autocast, autocast_dtype) = ctx.meta
        saved = ctx.saved_tensors
        weight, h = saved[0], saved[1]
        factors = saved[2:2 + n_factors]
        sources = saved[2 + n_factors:]
        needs = ctx.needs_input_grad
        need_x, need_factors = needs[0], needs[7:]
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
            g = grad_y.reshape(-1, grad_y.shape[-1])
            psis, phis = factors[0::2], factors[1::2]
            grads: list[Optional[torch.Tensor]] = [None] * n_factors
            gh_parts = []
            grad_x = torch.mm(g, weight) if need_x else None
            offset = 0
            for i, (phi, scale, rw) in enumerate(zip(phis, scales, rows)):
                h_i = h[:, offset:offset + phi.shape[1]]
                offset += phi.shape[1]
                w_rows = weight if rw is None else weight[rw[0]:rw[1]]
                g_rows = g if rw is None else g[:, rw[0]:rw[1]]
                need_phi = need_factors[2 * i + 1]
                grad_phi = None
                if grad_x is not None and not output_form:
                    # Input form with dL/du = g·W at hand (needed for dL/dx anyway).
                    gh = _scaled(torch.mm(grad_x, phi), scale)
                    if need_phi:
                        grad_phi = torch.mm(grad_x.t(), h_i)
                else:
                    # Never form g·W_rows (N x d_in): go through d_out_rows x r products.
                    gh = torch.mm(g_rows, _scaled(torch.mm(w_rows, phi), scale))
                    if need_phi:
                        grad_phi = torch.mm(w_rows.t(), torch.mm(g_rows.t(), h_i))
                if grad_phi is not None:
                    grads[2 * i + 1] = _scaled(grad_phi, scale)
                gh_parts.append(gh)
            gh_all = gh_parts[0] if len(gh_parts) == 1 else torch.cat(gh_parts, dim=1)
            if any(need_factors[0::2]):
                cast = autocast_dtype if autocast else None
                grad_psi = _psi_grad(gh_all, sources, rebuild, d_in, cast)
                offset = 0
                for i, phi in enumerate(phis):
                    if need_factors[2 * i]:
                        grads[2 * i] = grad_psi[offset:offset + phi.shape[1]]
                    offset += phi.shape[1]
            if grad_x is not None:
                psi_all = psis[0] if len(psis) == 1 else torch.cat(psis)
                # In place: g·W is this function's own buffer (psi cast by hand: in-place ops
                # are outside autocast).
                grad_x.addmm_(gh_all.to(grad_x.dtype), psi_all.to(grad_x.dtype))
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype).reshape(*grad_y.shape[:-1], d_in)
        grads = [None if gr is None else gr.to(f.dtype) for gr, f in zip(grads, factors)]
        return (grad_x, None, None, None, None, None, None, *grads)


def _psi_grad(gh: torch.Tensor, sources: Sequence[torch.Tensor], rebuild: Optional[Rebuild],
              d_in: int, cast: Optional[torch.dtype]) -> torch.Tensor:
    """dL/dpsi = gh^T·x, with x saved (``rebuild`` None) or rebuilt chunk by chunk from sources."""
    def prepared(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, d_in)
        return x.to(cast) if cast is not None and x.dtype == torch.float32 else x

    if rebuild is None:
        return torch.mm(gh.t(), prepared(sources[0]))
    lead = sources[0].shape[0]
    rows_per = gh.shape[0] // lead
    step = max(1, _CHUNK_ELEMENTS // max(rows_per * d_in, 1))
    grad: Optional[torch.Tensor] = None
    for start in range(0, lead, step):
        x = prepared(rebuild(*(s[start:start + step] for s in sources)))
        gh_rows = gh[start * rows_per:start * rows_per + x.shape[0]]
        grad = torch.mm(gh_rows.t(), x) if grad is None else grad.addmm_(gh_rows.t(), x)
    return grad


def wegeft_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  edits: Sequence[EditSpec], recompute: bool = False,
                  output_form: Optional[bool] = None) -> torch.Tensor:
    """The fast path: equal to :func:`wegeft_linear_plain` in outputs and every gradient.

    Args:
        edits: one whole-layer edit (``rows=None``) or disjoint row-block edits.
        recompute: rebuild x in backward from what its producer saved (see the module docstring).
        output_form: force the form (tests); None picks the cheaper one.

    A trainable frozen weight or bias (not how adapters are used) falls back to the plain form,
    whose autograd also gives W its gradient.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return wegeft_linear_plain(x, weight, bias, edits)
    whole = len(edits) == 1 and edits[0].rows is None
    if not whole and any(e.rows is None for e in edits):
        raise ValueError("a whole-layer edit cannot be combined with row-block edits")
    if output_form is None:
        tokens = x.numel() // max(x.shape[-1], 1)
        output_form = use_output_form(tokens, weight.shape[1], weight.shape[0], whole)
    elif not output_form and not whole:
        raise ValueError("row-block (q/k/v part) edits need the output form")
    recipe = input_recipe(x) if recompute and torch.is_grad_enabled() else None
    factors = [t for e in edits for t in (e.psi, e.phi)]
    return _WeGeFTLinearFunction.apply(
        x, weight, bias, tuple(float(e.scale) for e in edits), tuple(e.rows for e in edits),
        output_form, recipe, *factors)


# --- measurement ----------------------------------------------------------------------------------

def saved_activation_bytes(output: torch.Tensor, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that ``output``'s autograd graph keeps for backward.

    Walks the graph and reads each node's saved tensors, so it sees what recompute saves (a
    ``saved_tensors_hooks`` counter would switch recompute off, see :func:`input_recipe`).
    Storages of ``exclude`` (pass the model's parameters) are not counted.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        values: list[object] = []
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            values.extend(node.saved_tensors)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                values.extend(value if isinstance(value, (tuple, list)) else (value,))
        for value in values:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if storage.data_ptr() not in excluded:
                    storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())
