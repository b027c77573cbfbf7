"""Fused decoder layers: merged projections at load, the layer's math in two functions torch.compile can fuse.

`fuse_model(model)` rewrites each Llama/Qwen2/Mistral-style decoder layer once, after loading (after any
sharding: it merges whatever plain `nn.Linear` projections it finds, e.g. a rank's column shards):

- q/k/v become one `qkv_proj` Linear and gate/up one `gate_up_proj` Linear (weights concatenated once; the
  originals are freed), so a layer runs 4 matrix products instead of 7;
- the layer's forward becomes `attention_inputs` (RMSNorm, the merged projection, rotary) → the model's
  attention function (unchanged: the paged kernels, or transformers' own for other forwards) →
  `attention_output_and_mlp` (output projection, residual, RMSNorm, gate/up, SiLU·up, down, residual).
  Both are pure tensor functions of the layer's weights: with `compile=True` they are `torch.compile`d
  once per process and shared by every layer (Inductor fuses each norm, rotary and activation into one
  kernel around the matrix products); without it they run eagerly (the same arithmetic). Layers with 4-bit
  projection modules, or a rank's row-parallel output and down projections under tensor parallelism (partial
  product, all-reduce, bias: `tp_shard.RowParallelLinear`), compile the pieces between the products instead
  (`AroundProducts`) and call those modules.

Steering is untouched: hooks sit on the decoder layers' outputs (and the embeddings), whose module
calls are unchanged. Layers that do not fit (quantised or wrapped projections, hooks on a projection,
another norm or activation, Qwen3-style q/k norms) are left as they are; AWQ / GPTQ layers repacked for
GemLite are fused at load by `infrastructure/quant_gemlite.py` with merged 4-bit modules (`project`).
Checkpoints load unchanged: fusion happens on the loaded model, never in the weights on disk. Not
preserved: transformers' `output_attentions` recording on the attention modules (this project never asks for it).
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from infrastructure.steering.sites import decoder_layers

log = logging.getLogger(__name__)

LAYER_TYPES = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}
FUSED_MARK = "_persona_fused"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen2 RMSNorm, in float32, cast back before the weight (as transformers does)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """A merged projection: F.linear for plain weights; a 4-bit module (`weight` is the module itself, e.g.
    GemLite's, `infrastructure/quant_gemlite.py`) computes its own product and bias."""
    return F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else weight(x)


def rotary(qkv: torch.Tensor, cos, sin, sizes: list[int], head_dim: int):
    """Merged q/k/v outputs [B,T,sum(sizes)] -> query [B,heads,T,d], key and value [B,kv_heads,T,d], rotary
    applied to q and k."""
    q, k, v = qkv.split(sizes, dim=-1)
    shape = (*qkv.shape[:-1], -1, head_dim)
    q, k, v = (t.reshape(shape) for t in (q, k, v))  # [B,T,heads,d]: rotary in token-major memory, so the
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # paged kernels' [T,heads,d] views need no copy
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def add_rms_norm(residual: torch.Tensor, out: torch.Tensor, norm_w: torch.Tensor, eps: float) -> tuple:
    """(residual + out, its RMSNorm): the attention block's residual and the MLP's input."""
    h = residual + out
    return h, rms_norm(h, norm_w, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention_inputs(hidden, norm_w, eps: float, qkv_w, qkv_b, cos, sin, sizes: list[int], head_dim: int):
    """hidden [B,T,H] -> query [B,heads,T,d], key and value [B,kv_heads,T,d], rotary applied to q and k."""
    return rotary(project(rms_norm(hidden, norm_w, eps), qkv_w, qkv_b), cos, sin, sizes, head_dim)


def attention_output_and_mlp(attn, residual, o_w, o_b, norm_w, eps: float, gate_up_w, gate_up_b, down_w, down_b):
    """The rest of a layer after attention: attn [B,T,heads*d], residual [B,T,H] -> the layer's output."""
    h, x = add_rms_norm(residual, project(attn, o_w, o_b), norm_w, eps)
    return h + project(silu_mul(project(x, gate_up_w, gate_up_b)), down_w, down_b)


@dataclass(frozen=True)
class AroundProducts:
    """A layer's two functions for 4-bit projection modules (GemLite's, `infrastructure/quant_gemlite.py`),
    which torch.compile cannot take as inputs (every layer's modules would be a graph of its own): the
    products run as the modules' own kernels, and what lies between them (RMSNorm, rotary, residual + RMSNorm,
    SiLU·up) runs as compiled pieces shared by every layer. Same arithmetic as the two functions above."""

    norm: object
    rope: object
    residual_norm: object
    act: object

    def pre(self, hidden, norm_w, eps: float, qkv_w, qkv_b, cos, sin, sizes: list[int], head_dim: int):
        return self.rope(project(self.norm(hidden, norm_w, eps), qkv_w, qkv_b), cos, sin, sizes, head_dim)

    def post(self, attn, residual, o_w, o_b, norm_w, eps: float, gate_up_w, gate_up_b, down_w, down_b):
        h, x = self.residual_norm(residual, project(attn, o_w, o_b), norm_w, eps)
        return h + project(self.act(project(x, gate_up_w, gate_up_b)), down_w, down_b)


@dataclass
class Fused:
    """A fused layer's parts: the two functions (eager or compiled) and the sizes of its merged outputs."""

    pre: object
    post: object
    sizes: list[int]
    head_dim: int
    eager_attention: object


def _plain(m: object) -> bool:
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def product_module(m: object) -> bool:
    """A projection that computes more than its product and must run as itself (a tensor-parallel row-parallel
    layer: partial product, all-reduce, bias): the fused forward calls it between the compiled pieces."""
    return isinstance(m, nn.Module) and getattr(m, "fused_as_module", False) and _no_hooks(m)


def plain_products(*modules: nn.Module) -> bool:
    """Whether the fused forward can take every projection as weight tensors (compiled whole, `tensors`)."""
    return all(isinstance(m, nn.Linear) for m in modules)


def _norm_ok(m: object) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and _no_hooks(m)


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def fusable(layer: nn.Module, linear_ok=_plain) -> bool:
    """Whether a decoder layer has the structure the fused forward reproduces exactly (`linear_ok`: which
    projection modules it can merge; plain Linears by default)."""
    if type(layer).__name__ not in LAYER_TYPES or getattr(layer, FUSED_MARK, None) is not None:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or hasattr(attn, "q_norm") or not (_no_hooks(attn) and _no_hooks(mlp)):
        return False
    if any("forward" in vars(m) for m in (layer, attn, mlp)):  # a forward replaced by other code (e.g. a
        return False  # tensor-parallel all-reduce): the fused forward would bypass it
    if not all(linear_ok(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
        return False  # merged: modules `linear_ok` takes; o and down are called: those or product modules
    if not all(linear_ok(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj")):
        return False
    if not all(
        linear_ok(m) or product_module(m) for m in (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None))
    ):
        return False
    if getattr(getattr(mlp, "config", None), "hidden_act", None) != "silu" or not _no_hooks(mlp.act_fn):
        return False
    if mlp.gate_proj.out_features != mlp.up_proj.out_features:
        return False
    biases = {attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}
    mlp_biases = {mlp.gate_proj.bias is None, mlp.up_proj.bias is None}
    if len(biases) > 1 or len(mlp_biases) > 1:
        return False
    return _norm_ok(layer.input_layernorm) and _norm_ok(layer.post_attention_layernorm)


def merge_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs concatenated (weights copied once)."""
    first = parts[0]
    out = sum(p.out_features for p in parts)
    merged = nn.Linear(first.in_features, out, bias=first.bias is not None, device="meta", dtype=first.weight.dtype)
    merged.weight = nn.Parameter(torch.cat([p.weight.data for p in parts]), requires_grad=False)
    if first.bias is not None:
        merged.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
    return merged


def _fuse_layer(layer: nn.Module, pre, post, merge=merge_linears) -> None:
    """Merge q/k/v and gate/up with `merge` (a list of projections -> one module) and install the fused forward."""
    attn, mlp = layer.self_attn, layer.mlp
    sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    attn.qkv_proj = merge([attn.q_proj, attn.k_proj, attn.v_proj])
    mlp.gate_up_proj = merge([mlp.gate_proj, mlp.up_proj])
    for owner, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (mlp, "gate_proj"), (mlp, "up_proj")):
        delattr(owner, name)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    setattr(layer, FUSED_MARK, Fused(pre, post, sizes, attn.head_dim, eager))
    layer.forward = types.MethodType(fused_layer_forward, layer)


def fused_layer_forward(
    self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
    position_embeddings=None, **kwargs,
):  # fmt: skip
    """The decoder layer's forward (same signature and arithmetic as transformers' Llama/Qwen2 layer)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    f: Fused = getattr(self, FUSED_MARK)
    attn, mlp = self.self_attn, self.mlp
    ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
    cos, sin = position_embeddings
    q, k, v = f.pre(hidden_states, ln1.weight, ln1.variance_epsilon, *weight_and_bias(attn.qkv_proj),
                    cos, sin, f.sizes, f.head_dim)  # fmt: skip
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, attn.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, f.eager_attention)
    if hasattr(attn, "sliding_window"):  # Qwen2 passes its layer's window (None for full attention)
        kwargs["sliding_window"] = attn.sliding_window
    kwargs |= {"position_ids": position_ids, "use_cache": use_cache}  # as transformers' layer hands them on
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return f.post(out, hidden_states, *weight_and_bias(attn.o_proj), ln2.weight, ln2.variance_epsilon,
                  *weight_and_bias(mlp.gate_up_proj), *weight_and_bias(mlp.down_proj))  # fmt: skip


def weight_and_bias(m: nn.Module) -> tuple:
    """(weight, bias) of a plain Linear; (the module, None) of a 4-bit one, which `project` calls."""
    return (m.weight, m.bias) if isinstance(m, nn.Linear) else (m, None)


_COMPILED: dict[tuple, tuple] = {}


def compiled_parts(backend="inductor", products: str = "tensors") -> tuple:
    """A layer's (pre, post) compiled once per process, backend and kind of projections (shared by every layer
    and model): `tensors` (plain weights) compiles the two layer functions whole; `modules` (4-bit modules)
    compiles the pieces between the products (`AroundProducts`). Shapes: the token count is specialised on
    first use and becomes dynamic at the second (one compile serves every batch bucket and prompt length)."""
    key = (backend, products)
    if key not in _COMPILED:
        raise_recompile_limit()

        def compiled(fn):
            return torch.compile(fn, backend=backend, fullgraph=True)

        if products == "tensors":
            _COMPILED[key] = (compiled(attention_inputs), compiled(attention_output_and_mlp))
        else:
            around = AroundProducts(compiled(rms_norm), compiled(rotary), compiled(add_rms_norm), compiled(silu_mul))
            _COMPILED[key] = (around.pre, around.post)
    return _COMPILED[key]


def raise_recompile_limit(limit: int = 64) -> None:
    """Each steering layout (add / caps / orthogonal decompositions at a site) is one graph of the
    steering function: allow more than dynamo's default 8 before it falls back to eager. Dynamo's config is
    thread-local: call it in the thread that runs the compiled functions."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def fuse_model(model: nn.Module, compile: bool = False, backend="inductor") -> int:
    """Fuse every decoder layer that fits (idempotent). Returns how many layers are fused now."""
    eager = (attention_inputs, attention_output_and_mlp)
    layers = decoder_layers(model)
    done = 0
    with torch.no_grad():
        for layer in layers:
            if fusable(layer):
                _fuse_layer(layer, *eager)
            fused = getattr(layer, FUSED_MARK, None)
            if fused is not None:  # fused here or earlier (4-bit layers: at load): this call's functions
                attn, mlp = layer.self_attn, layer.mlp
                whole = plain_products(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
                products = "tensors" if whole else "modules"
                fused.pre, fused.post = compiled_parts(backend, products) if compile else eager
                done += 1
    if done < len(layers):
        log.info("fused %d of %d decoder layers (the others keep transformers' forward)", done, len(layers))
    return done


def is_fused(model: nn.Module) -> bool:
    return any(getattr(layer, FUSED_MARK, None) is not None for layer in decoder_layers(model))
