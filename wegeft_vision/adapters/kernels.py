"""The WeGeFT linear layer's kernels: the plain form (the reference) and the fast path.

Both compute y = W(x + s·phi(psi(x))) + b, edited per q/k/v row block when the edits name rows.
The method (:mod:`.wegeft`) says *what* is computed; this module says *how*, and nothing else.
The plain form, :func:`wegeft_linear_plain`, is three autograd ops per edit: the reference every
test compares the fast path with. The fast path, :func:`wegeft_linear`, is one
``autograd.Function`` that

* saves only the layer input (or nothing, see *recompute*) and the r-dim h = psi(x);
* runs each layer in one of two equal algebraic forms, the one whose rank-r "expand" product
  (inner size r, an output as wide as a layer side) lands on the layer's narrow side: the *input
  form* u = x + s·h·phi^T, y = u·W^T + b when d_in < d_out (qkv, fc1), the *output form*
  y = x·W^T + b + h·(s·W·phi)^T, a LoRA-like product whose factor B = s·W·phi costs
  d_out·d_in·r once per step, when d_out <= d_in (proj, fc2) and for q/k/v parts (one frozen
  matmul, not one per part and a ``cat``). On a CPU every pass over an N x d activation costs
  about as much as a rank-16 product, so the narrow side is the cheaper one; see
  docs/performance.md for the profile (folding the rank-r products into the frozen matmuls by
  concatenation, [x | h]·[W | B]^T, measured slower: the concatenations are such passes);
* in backward never forms dW, reads the narrow side for the rank-r products, and skips the frozen
  d_out x d_in matmul when x needs no gradient.

*Recompute*: the input of an adapted layer is usually a tensor the network keeps anyway in
another form: fc2's input is GELU(z) and GELU saves z (in a gated MLP, SwiGLU, it is a product
whose two factors the product saves); qkv's and fc1's inputs are LayerNorm outputs and LayerNorm
saves its input and statistics; attn.proj's input is a reshaped copy of the
attention output, which scaled-dot-product attention saves. With ``recompute=True`` the layer saves
those tensors (no new memory) and rebuilds x in backward (one elementwise pass). Each recipe is
checked against a real x at its first use on each device type and dtype (their kernels and saved
tensors differ); one that fails (another PyTorch, another device) is switched off there: x is
saved.

Without a gradient to compute (``torch.no_grad``, frozen adapters) and under ``torch.export``,
the same forms run as plain ops, outside the ``autograd.Function``: nothing needs saving, and
``torch.compile`` / ``torch.export`` trace plain ops. The form depends on the layer's shape only,
so a graph with a symbolic batch holds no branch on it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


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


def _mul_recipe(node: torch.autograd.graph.Node, x: torch.Tensor
                ) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    """x = a * b, both factors saved by the product (a gated MLP: SwiGLU's act(gate) * value)."""
    a, b = node._saved_self, node._saved_other
    if a is None or b is None or not all(t.shape == x.shape and t.dtype == x.dtype
                                         for t in (a, b)):
        return None
    return torch.mul, (a, b)


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
    "MulBackward0": _mul_recipe,
    "NativeLayerNormBackward0": _layer_norm_recipe,
    "UnsafeViewBackward0": _saved_output_recipe,
    "ViewBackward0": _saved_output_recipe,
}


def _saved_tensor_hooks_active() -> bool:
    # Hooks (offloading, non-reentrant checkpointing) may move or drop what a node saved; reading
    # it back during forward would then cost a copy or a recomputation, so recompute stands down.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


# (node type name, device type, dtype) -> whether the recipe reads what that node saved there
# correctly. The recipes read private attributes (_saved_self, _saved_result1, ...), and what a
# node saves depends on the kernel that ran (a CUDA bf16 LayerNorm is not the CPU float32 one): a
# check passed on one device and dtype vouches for nothing on another. A failed check must cost
# memory (x is saved), never a crash or a wrong gradient.
RecipeKey = tuple[str, str, torch.dtype]
_RECIPE_WORKS: dict[RecipeKey, bool] = {}


def _recipe_unusable(key: RecipeKey, reason: str) -> None:
    _RECIPE_WORKS[key] = False
    name, device, dtype = key
    warnings.warn(f"WeGeFT recompute: cannot rebuild a layer input from what {name} saves in "
                  f"torch {torch.__version__} on {device} {str(dtype).removeprefix('torch.')} "
                  f"({reason}); those layers save their input instead", RuntimeWarning,
                  stacklevel=3)


def input_recipe(x: torch.Tensor) -> Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]:
    """How to rebuild ``x`` in backward from tensors its producer already saved, if known.

    The first use of each recipe on each (device type, dtype) rebuilds x in full and compares it
    with x; a recipe that fails to read the node or rebuilds something else is switched off for
    that device type and dtype, for the process, with a warning.
    """
    # Compiled graphs have no grad_fn to read; the compiler's partitioner recomputes by itself.
    if torch.compiler.is_compiling() or _saved_tensor_hooks_active():
        return None
    node = x.grad_fn
    if node is None:
        return None
    name = type(node).__name__
    make = _RECIPES.get(name)
    key = (name, x.device.type, x.dtype)
    if make is None or _RECIPE_WORKS.get(key) is False:
        return None
    try:
        recipe = make(node, x)
        if recipe is None or key in _RECIPE_WORKS:
            return recipe
        with torch.no_grad():
            acc = torch.promote_types(x.dtype, torch.float32)
            rebuilt, target = recipe[0](*recipe[1]).to(acc), x.to(acc)
            # Rebuilds are exact on CPU; a few units of rounding allow for other kernels.
            tol = 8 * torch.finfo(x.dtype).eps
            works = rebuilt.shape == x.shape and bool(
                ((rebuilt - target).norm() <= tol * target.norm()).item())
    except Exception as error:  # noqa: BLE001 - any failure reading autograd internals
        _recipe_unusable(key, f"{type(error).__name__}: {error}")
        return None
    if not works:
        _recipe_unusable(key, "the rebuilt input differs from the input")
        return None
    _RECIPE_WORKS[key] = True
    return recipe


# --- the fast path --------------------------------------------------------------------------------

def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def use_output_form(d_in: int, d_out: int, whole: bool) -> bool:
    """Whether a layer runs the output form y = xW^T + b + h(sW·phi)^T, else the input form.

    Both forms do the same multiply-adds but for B = sW·phi (d_out·d_in·r, once per step); they
    differ in which side of the layer their rank-r expand product and dL/dphi pass over: N x d_in
    for the input form, N x d_out for the output form. Profiled on CPU, each such pass costs about
    as much as a rank-16 product, so the narrow side wins; at d_in = d_out the output form also
    saves the copy that u = x + s·h·phi^T is. Row blocks (q/k/v parts) always take the output
    form: one frozen matmul, not one per part. The choice depends on the shape only, so a graph
    traced with a symbolic batch holds no branch on it.
    """
    return not whole or d_out <= d_in


# Per edit, as the Function takes it: (scale s, output rows or None for all, rank).
Layout = tuple[tuple[float, Optional[tuple[int, int]], int], ...]


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             psi: torch.Tensor, phi: torch.Tensor, layout: Layout, output_form: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast forward in plain ops: (x as a 2-D matrix, as psi read it; y, 2-D; h = psi(x)).

    ``psi``/``phi``: every edit's factors stacked (r_total x d_in, d_in x r_total).
    """
    device_type = x.device.type
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(device_type) and x2.dtype == torch.float32:
        # Cast once and keep the cast copy, as autocast's F.linear would for psi's input.
        x2 = x2.to(torch.get_autocast_dtype(device_type))
    h = torch.mm(x2, psi.t())
    if not output_form:
        u = torch.addmm(x2, h, phi.t(), alpha=layout[0][0])
        return x2, F.linear(u, weight, bias), h
    y = F.linear(x2, weight, bias)
    offset = 0
    for scale, rw, rank in layout:
        w_rows = weight if rw is None else weight[rw[0]:rw[1]]
        b_fac = _scaled(torch.mm(w_rows, phi[:, offset:offset + rank]), scale)
        y_rows = y if rw is None else y[:, rw[0]:rw[1]]
        y_rows.addmm_(h[:, offset:offset + rank], b_fac.t())
        offset += rank
    return x2, y, h


class _WeGeFTLinearFunction(torch.autograd.Function):
    """Inputs: x, W, b, the stacked psi and phi, then what describes the edits.

    The signature is fixed on purpose. Dynamo, when it inlines ``forward`` (no input needs a
    gradient), drops ``ctx`` whenever the argument count equals forward's parameter count,
    which a variadic ``*factors`` hits for one particular number of edits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                psi: torch.Tensor, phi: torch.Tensor, layout: Layout, output_form: bool,
                recipe: Optional[tuple[Rebuild, tuple[torch.Tensor, ...]]]) -> torch.Tensor:
        device_type = x.device.type
        x2, y, h = _forward(x, weight, bias, psi, phi, layout, output_form)
        sources = (x2,) if recipe is None else recipe[1]
        # B = sW·phi is rebuilt in backward rather than kept: saved memory stays at x and h.
        ctx.save_for_backward(weight, h, psi, phi, *sources)
        ctx.meta = (layout, output_form, x.dtype, x.shape[-1],
                    None if recipe is None else recipe[0], device_type,
                    torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        # Not a view (``reshape`` would be one): autograd forbids in-place ops on a view made
        # inside a custom Function, and EVA's and BEiT's attention add their q/v biases to this
        # output in place (see AdaptedLinear's qkv handling).
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (layout, output_form, x_dtype, d_in, rebuild, device_type, autocast,
         autocast_dtype) = ctx.meta
        weight, h, psi, phi, *sources = ctx.saved_tensors
        need_x, _, _, need_psi, need_phi = ctx.needs_input_grad[:5]
        grad_x = grad_psi = grad_phi = None
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
            g = grad_y.reshape(-1, grad_y.shape[-1])
            grad_phis, gh_parts = [], []
            # The input form needs dL/du = g·W first; the output form adds g·W last (below).
            grad_x = torch.mm(g, weight) if need_x and not output_form else None
            offset = 0
            for scale, rw, rank in layout:
                h_i, phi_i = h[:, offset:offset + rank], phi[:, offset:offset + rank]
                offset += rank
                w_rows = weight if rw is None else weight[rw[0]:rw[1]]
                g_rows = g if rw is None else g[:, rw[0]:rw[1]]
                # The reductions over N are written as h^T·G (r x d): MKL runs that orientation
                # up to twice as fast as G^T·h (d x r) at these shapes.
                if grad_x is not None and not output_form:
                    # Input form with dL/du = g·W at hand (needed for dL/dx anyway).
                    gh = _scaled(torch.mm(grad_x, phi_i), scale)
                    if need_phi:
                        grad_phis.append(_scaled(torch.mm(h_i.t(), grad_x), scale).t())
                else:
                    # Never form g·W_rows (N x d_in): go through d_out_rows x r products.
                    gh = torch.mm(g_rows, _scaled(torch.mm(w_rows, phi_i), scale))
                    if need_phi:
                        grad_phis.append(_scaled(
                            torch.mm(w_rows.t(), torch.mm(h_i.t(), g_rows).t()), scale))
                gh_parts.append(gh)
            gh_all = gh_parts[0] if len(gh_parts) == 1 else torch.cat(gh_parts, dim=1)
            if need_psi:
                cast = autocast_dtype if autocast else None
                grad_psi = _psi_grad(gh_all, sources, rebuild, d_in, cast).to(psi.dtype)
            if need_phi:
                grad_phi = grad_phis[0] if len(grad_phis) == 1 else torch.cat(grad_phis, dim=1)
                grad_phi = grad_phi.to(phi.dtype)
            # In place, in this function's own buffer (factors cast by hand: in-place ops are
            # outside autocast).
            if grad_x is not None:
                grad_x.addmm_(gh_all.to(grad_x.dtype), psi.to(grad_x.dtype))
            elif need_x:
                # The rank-r term first, then g·W accumulated onto it by the frozen matmul
                # itself: one pass less over the wide N x d_in (fc2's 4d) than adding after.
                grad_x = torch.mm(gh_all, psi)
                grad_x.addmm_(g.to(grad_x.dtype), weight.to(grad_x.dtype))
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype).reshape(*grad_y.shape[:-1], d_in)
        return grad_x, None, None, grad_psi, grad_phi, None, None, None


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
        output_form: force the form (tests); None: by the layer's shape (:func:`use_output_form`).

    A trainable frozen weight or bias (not how adapters are used) falls back to the plain form,
    whose autograd also gives W its gradient.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return wegeft_linear_plain(x, weight, bias, edits)
    whole = len(edits) == 1 and edits[0].rows is None
    if not whole and any(e.rows is None for e in edits):
        raise ValueError("a whole-layer edit cannot be combined with row-block edits")
    if output_form is None:
        output_form = use_output_form(weight.shape[1], weight.shape[0], whole)
    elif not output_form and not whole:
        raise ValueError("row-block (q/k/v part) edits need the output form")
    psi = edits[0].psi if len(edits) == 1 else torch.cat([e.psi for e in edits])
    phi = edits[0].phi if len(edits) == 1 else torch.cat([e.phi for e in edits], dim=1)
    layout = tuple((float(e.scale), e.rows, e.phi.shape[1]) for e in edits)
    training = torch.is_grad_enabled() and (x.requires_grad or psi.requires_grad
                                            or phi.requires_grad)
    if not training or torch.compiler.is_exporting():
        # Nothing to save for backward, so no autograd.Function: inference and validation
        # (also compiled) and export run the same forms as plain ops.
        y = _forward(x, weight, bias, psi, phi, layout, output_form)[1]
        return y.reshape(*x.shape[:-1], weight.shape[0])
    recipe = input_recipe(x) if recompute else None
    return _WeGeFTLinearFunction.apply(x, weight, bias, psi, phi, layout, output_form, recipe)


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
