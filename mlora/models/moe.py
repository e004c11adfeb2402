"""The sparse MLP of mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS,
GLM-4.5, DeepSeek-V2, DeepSeek-V3, Mistral Small 4.

A linear router scores every token against every expert; each token goes to its
`num_experts_per_tok` best experts (softmax probabilities, renormalized over the chosen ones
where the family does), and the layer's output is the sum of those experts' SwiGLU outputs
weighted by the probabilities. Qwen2-MoE adds a shared expert that every token passes through,
scaled by a sigmoid gate. GPT-OSS's router has a bias and takes the softmax of the top k logits;
its experts have biases and a clamped GLU (llama.MLP). GLM-4.5's router is DeepSeek-V3's (sigmoid
scores, a correction bias, groups of experts; _sigmoid_route), and its shared experts are ungated.
DeepSeek-V2's router takes softmax scores within the groups of the best single scores, scaled and
never renormalized (_grouped_softmax_route). Mistral Small 4's takes softmax scores in the model's
dtype within the groups whose two best scores sum highest, renormalized and scaled
(_grouped_top2_softmax_route); its shared experts are DeepSeek-V3's. Gemma 4 26B-A4B's experts
run beside each layer's dense MLP, routed by a router of their own (Gemma4Router, run_experts;
the layer wires them: llama.DecoderLayer). Llama 4's router takes the sigmoid of the top k
logits, and these weights scale the chosen experts' input instead of their output
(experts_input_weighted); its shared expert is ungated.

The experts are plain `MLP` modules in an `nn.ModuleList`, so their projections are the
`nn.Linear` attributes the LoRA and quantization code already handle, and their names are the
checkpoints' (`model.layers.3.mlp.experts.5.up_proj.weight`; Mixtral's `block_sparse_moe.
experts.5.w3` translates in naming.py). transformers 5 stacks each layer's experts into 3D
parameters instead; it writes the per-expert layout above, which is also what most released
checkpoints and PEFT adapters use, and reads both. Checkpoints that stack them (GPT-OSS's,
Qwen3.5-MoE's, a transformers 5 state_dict saved as is) are read by each expert reading its slice
(loader.py, naming.StackedSlice); GPT-OSS's, Gemma 4 26B-A4B's and Llama 4's LoRA is saved stacked
(stacked_lora.py). Gemma 4's and Llama 4's experts keep gate and up fused in one gate_up_proj (one
LoRA on it, as PEFT's); Gemma 4's routing hook hangs off the decoder layer
(llama.DecoderLayer.routing_hook).

They run as grouped GEMMs (`torch._grouped_mm`, as transformers 5 runs its experts): each
projection of every expert in one GEMM over the routed tokens sorted by expert, the experts'
weights views of one stack per projection (grouped_stacks, grouped_experts); one expert after
another where that cannot run (quantized experts, a dtype or device torch does not group in).

The router is frozen and never a LoRA target, as in PEFT's usual setups; only the language
modelling loss is trained (transformers adds the router's load-balancing loss only when
`output_router_logits` is set, which released configs do not).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import repeat
from operator import attrgetter, itemgetter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlora.models.args import ModelArgs


def moe_tensor_names(args: ModelArgs, prefix: str) -> list[str]:
    """The checkpoint tensors of one sparse MLP; prefix is its path ('model.layers.3.mlp.')."""
    # (Llama 4's experts hold gate and up as one gate_up_proj, its shared expert as two: llama.DecoderLayer)
    projections = ("gate_up_proj", "down_proj") if args.fused_gate_up or args.experts_named else EXPERT_PROJECTIONS
    names = [prefix + "gate.weight"] + ([prefix + "gate.bias"] if args.router_bias else [])
    if args.router == "sigmoid":
        names.append(prefix + "gate.e_score_correction_bias")
    for e in range(args.num_experts):
        for proj in projections:
            names += [f"{prefix}experts.{e}.{proj}.weight"]
            names += [f"{prefix}experts.{e}.{proj}.bias"] if args.mlp_bias else []
    if args.shared_expert_intermediate_size:
        names += [f"{prefix}shared_expert.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        if args.shared_expert_gated:
            names.append(prefix + "shared_expert_gate.weight")
    return names


class _PairGather(torch.autograd.Function):
    """x.index_select(0, index) where index visits every row of x exactly k times (the routing's
    (token, slot) pairs, or a permutation with k = 1), with `inverse` the position each pair
    went to. Its backward gathers with the inverse and sums each row's k copies; autograd's own
    backward of a gather is an accumulating scatter (index_put_), which took most of an MoE
    layer's backward on the CPU and uses atomic adds on CUDA."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k, ctx.rows = k, x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)  # [rows * k, ...]: each row's k copies together
        if ctx.k > 1:
            g = g.view(ctx.rows, ctx.k, *g.shape[1:]).sum(dim=1)
        return g, None, None, None


class _GroupedLinear(torch.autograd.Function):
    """y [M, out] = x [M, in] @ w[e]^T for each expert e's run of rows (ends [E] int32: where
    each run ends); w [E, out, in] frozen. Its backward hands grouped_mm a contiguous gradient
    (which it needs) and computes only dx."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, ends: Tensor) -> Tensor:
        ctx.save_for_backward(w, ends)
        return _GROUPED_MM(x, w.transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, ends = ctx.saved_tensors
        dx = _GROUPED_MM(grad.contiguous(), w, offs=ends) if ctx.needs_input_grad[0] else None
        return dx, None, None


_GROUPED_MM = getattr(torch, "_grouped_mm", None)
# Off: every expert runs on its own (tests and benchmarks compare the two).
GROUPED_EXPERTS = os.environ.get("MLORA_GROUPED_EXPERTS", "1") != "0"
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def grouped_mm_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's grouped GEMM runs in dtype on device: bf16 on CUDA devices of compute
    capability 9.0 and up (the kernel torch has), fp32 or bf16 on the CPU."""
    if _GROUPED_MM is None:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _frozen_linear(module: nn.Module) -> nn.Linear | None:
    """The plain frozen nn.Linear of an expert's projection (under a LoRA wrapper: its base);
    None for anything else (a quantized layer, a trained weight or bias)."""
    base = getattr(module, "base", module)
    if (type(base) is not nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    return base


def expert_projections(expert: nn.Module) -> tuple[str, ...]:
    """An expert MLP's projections, in the order they run: (gate_up_proj, down_proj) fused,
    else (gate_proj, up_proj, down_proj)."""
    return ("gate_up_proj", "down_proj") if getattr(expert, "fused", False) else EXPERT_PROJECTIONS


def grouped_stacks(experts: nn.ModuleList, flat: Tensor) -> dict[str, tuple[Tensor, Tensor | None]] | None:
    """{projection: (weight [E, out, in], bias [E, out] or None)} of the experts, for grouped
    GEMMs; None where they cannot run grouped: not llama.MLP experts, quantized or in another
    dtype than flat, rows not 16-byte aligned (torch._grouped_mm's rule), or a dtype torch's
    grouped GEMM lacks on the device (CUDA: bf16 on compute capability 9.0 and up).

    Each expert's weight (and bias) becomes a view into one [E, ...] tensor (a copy on first
    use, again whenever one was replaced, e.g. by .to()); the stack handed out is a view of that
    storage, made per call, so no reference outlives the modules' own (nothing is cached that
    .to(), quantize_model or a swapped module would leave behind). The modules and their names
    stay as they are."""
    first = experts[0]
    names = expert_projections(first)
    if (not GROUPED_EXPERTS or not all(hasattr(first, name) for name in names)
            or not all(hasattr(first, attr) for attr in ("split", "glu"))):
        return None
    if not grouped_mm_runs(flat.dtype, flat.device):
        return None
    # Once stacked, every later call finds them so: the views, checked for every expert by
    # C-level maps over the modules' own dicts (128 experts: ~0.1 ms a layer; the pass below,
    # through nn.Module.__getattr__ and a storage per parameter, takes ~3 ms).
    views = _stacked_views(experts, names, flat)
    if views is not None:
        return views
    stacks = {}
    for name in names:
        linears = [_frozen_linear(getattr(expert, name)) for expert in experts]
        if any(lin is None or lin.weight.dtype != flat.dtype or lin.weight.device != flat.device for lin in linears):
            return None
        shape = linears[0].weight.shape
        if any(lin.weight.shape != shape for lin in linears) or any(d * flat.element_size() % 16 for d in shape):
            return None
        biased = [lin.bias is not None for lin in linears]
        if any(biased) and (not all(biased) or any(lin.bias.dtype != flat.dtype for lin in linears)):
            return None
        params = ([lin.weight for lin in linears], [lin.bias for lin in linears] if biased[0] else None)
        stacks[name] = tuple(_stack_of(ps) if ps is not None else None for ps in params)
    return stacks


_MODULES, _PARAMETERS = attrgetter("_modules"), attrgetter("_parameters")


def _stacked_views(experts: nn.ModuleList, names: tuple[str, ...], flat: Tensor
                   ) -> dict[str, tuple[Tensor, Tensor | None]] | None:
    """grouped_stacks' answer where the experts' projections (under a LoRA wrapper: its base)
    are plain nn.Linear whose frozen weights (and biases) in flat's dtype and device lie in one
    stack each already, every expert checked; None otherwise (grouped_stacks' full pass then
    decides). Accepts nothing that pass would refuse: the same checks, read from the modules'
    _modules and _parameters dicts directly."""
    experts_now = list(experts._modules.values())
    views = {}
    for name in names:
        try:
            outer = list(map(itemgetter(name), map(_MODULES, experts_now)))
            linears = list(map(dict.get, map(_MODULES, outer), repeat("base"), outer))
            if set(map(type, linears)) != {nn.Linear}:
                return None
            weights = list(map(itemgetter("weight"), map(_PARAMETERS, linears)))
            biases = list(map(itemgetter("bias"), map(_PARAMETERS, linears)))
        except KeyError:  # (an expert without that projection)
            return None
        weight = _view_if_stacked(weights, flat)
        if weight is None or any(d * flat.element_size() % 16 for d in weight.shape[1:]):
            return None
        if biases.count(None) == len(biases):
            views[name] = (weight, None)
        elif None in biases or (bias := _view_if_stacked(biases, flat)) is None:
            return None
        else:
            views[name] = (weight, bias)
    return views


def _view_if_stacked(params: list[nn.Parameter], flat: Tensor | None = None) -> Tensor | None:
    """[E, ...]: the view of the one storage the parameters (all of one shape, frozen, in flat's
    dtype and device where given) lie in, one after another; None where they do not. Each of
    them is checked (a middle one may have been replaced: .data, a new Parameter, a module)."""
    first, last = params[0], params[-1]
    if (any(map(_REQUIRES_GRAD, params)) or len(set(map(_SHAPE, params))) != 1
            or len(set(map(_DTYPE, params))) != 1 or not all(map(Tensor.is_contiguous, params))):
        return None
    if flat is not None and (first.dtype != flat.dtype or first.device != flat.device):
        return None
    step = first.numel() * first.element_size()
    base = first.data_ptr()
    if not step or list(map(Tensor.data_ptr, params)) != list(range(base, base + len(params) * step, step)):
        return None
    # (one storage: separate tensors may lie side by side by chance, e.g. in one CUDA segment;
    # the first and the last in one, every one between lies in it too)
    storage = first.untyped_storage()
    if last.untyped_storage().data_ptr() != storage.data_ptr():
        return None
    view = torch.empty(0, dtype=first.dtype, device=first.device)
    return view.set_(storage, first.storage_offset(), (len(params), *first.shape))


_REQUIRES_GRAD, _SHAPE, _DTYPE = attrgetter("requires_grad"), attrgetter("shape"), attrgetter("dtype")


def _stack_of(params: list[nn.Parameter]) -> Tensor:
    """[E, ...]: the parameters' stack, a view of their storage where they lie in one after
    another; else they are copied into one first and become its views. (Never under
    torch.inference_mode: llama.CausalLM.forward leaves it, so the stack is a normal tensor.)"""
    view = _view_if_stacked(params)
    if view is not None:
        return view
    with torch.no_grad():
        stack = torch.stack(list(params))  # [E, ...]
        for e, p in enumerate(params):
            p.data = stack[e]
    return stack


def grouped_experts(expert: nn.Module, stacks: dict[str, tuple[Tensor, Tensor | None]], x: Tensor,
                    experts_of: Tensor, ends: Tensor, lora) -> Tensor:
    """Every expert's MLP (llama.MLP: its split of a fused gate_up and its GLU) over its run of
    x [M, H] (runs ending at ends [E]; experts_of [M]: each row's expert, for the biases), as
    grouped GEMMs: [M, H]. lora(name, x, ends): the LoRA delta of that projection, or None
    (lora_moe.GroupedExpertLoRA); lora None: no LoRA."""

    def project(name: str, inputs: Tensor) -> Tensor:
        weight, bias = stacks[name]
        y = _GroupedLinear.apply(inputs, weight, ends)  # [M, out]; added to in place (it keeps no output)
        if bias is not None:
            y.add_(bias.index_select(0, experts_of))
        delta = lora(name, inputs, ends) if lora is not None else None
        return y if delta is None else y.add_(delta)

    if "gate_up_proj" in stacks:
        gate, up = expert.split(project("gate_up_proj", x))  # [M, I] each
    else:
        gate, up = project("gate_proj", x), project("up_proj", x)  # [M, I] each
    return project("down_proj", expert.glu(gate, up))


# What the LoRA code is told before a sparse MLP's experts run (lora_moe.ExpertRouting):
# (the expert of each routed token [N*k] and the token [N*k], both ordered by expert and then by
# token, the number of tokens each expert gets, tokens per batch row, tokens in the batch)
RoutingHook = Callable[[Tensor, Tensor, list[int], int, int], None]


def run_experts(experts: nn.ModuleList, flat: Tensor, weights: Tensor, chosen: Tensor,
                routing_hook: RoutingHook | None, S: int, input_weighted: bool = False) -> Tensor:
    """flat [N, H] through each token's chosen experts (chosen [N, k]), their outputs weighted
    by weights [N, k] and summed: [N, H] in flat's dtype. S: tokens per batch row (for the
    routing hook, which LoRA on the experts sets). input_weighted (Llama 4): the weights scale
    each expert's input instead, in the dtype.

    The experts run as grouped GEMMs over all of them at once where they can (grouped_stacks:
    unquantized experts in one dtype, and any LoRA on them the hook can group), else one after
    another."""
    N, H = flat.shape
    k = chosen.shape[1]
    # Every (token, slot) pair ordered by expert, and by token within an expert (a stable
    # sort of the flattened [N, k] choices, whose positions grow with the token).
    order = torch.argsort(chosen.flatten(), stable=True)  # [N*k]: the pair at each sorted position
    by_expert, tokens = chosen.flatten()[order], order // k  # [N*k] each
    stacks = grouped_stacks(experts, flat)
    lora = None
    if stacks is not None and routing_hook is not None:
        grouped_lora = getattr(routing_hook, "grouped", None)  # lora_moe.ExpertRouting.grouped
        lora = grouped_lora(tokens, S, N) if grouped_lora is not None else False
        if lora is False:  # LoRA on the experts that cannot be grouped: one expert at a time
            stacks = None
    if stacks is None:
        counts = torch.bincount(by_expert, minlength=len(experts)).tolist()  # tokens per expert
        if routing_hook is not None:
            routing_hook(by_expert, tokens, counts, S, N)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)  # each pair's sorted position
    # One gather and one split for all experts (a gather per expert would add a zero-filled
    # [N, H] gradient per expert in the backward).
    gathered = _PairGather.apply(flat, tokens, back, k)  # [N*k, H] by expert
    if input_weighted:
        gathered = gathered * weights.flatten()[order, None]
    if stacks is not None:
        # Each expert's tokens end at ends[e], found in the sorted experts on the device: no wait
        # for the host (torch.bincount on CUDA reads its input's maximum back first).
        bounds = torch.arange(1, len(experts) + 1, device=by_expert.device)  # [E]
        ends = torch.searchsorted(by_expert, bounds).to(torch.int32)  # [E]
        routed = grouped_experts(experts[0], stacks, gathered, by_expert, ends, lora)  # [N*k, H] by expert
    else:
        pieces = torch.split(gathered, counts)  # each [n, H]
        # An expert sees its n tokens as n rows of one token (what LoRA's row layout expects).
        outputs = [experts[e](piece.unsqueeze(1)).squeeze(1) if n else piece
                   for e, (piece, n) in enumerate(zip(pieces, counts))]
        routed = torch.cat(outputs)  # [N*k, H] by expert
    # Weighted in the weights' dtype (fp32 for Mixtral, else the dtype's rounding), then each
    # token's k outputs summed in fp32 in slot order and rounded once: transformers' default
    # experts implementation (grouped_mm) exactly.
    weighted = (routed if input_weighted else routed * weights.flatten()[order, None]).float()  # [N*k, H]
    by_pair = _PairGather.apply(weighted, back, order, 1)  # [N*k, H]: token-major
    return by_pair.view(N, k, H).sum(dim=1).to(flat.dtype)


# Gemma 4's norms around its experts: of their input, of the dense MLP's output, of theirs
BESIDE_NORMS = ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")


def beside_tensor_names(args: ModelArgs, prefix: str) -> list[str]:
    """Gemma 4's router, experts and their norms in one layer; prefix: its path ('model.layers.3.')."""
    names = [prefix + name for name in ("router.proj.weight", "router.scale", "router.per_expert_scale")]
    names += [f"{prefix}experts.{e}.{proj}.weight" for e in range(args.num_experts)
              for proj in ("gate_up_proj", "down_proj")]  # (gate and up fused: llama.DecoderLayer)
    return names + [f"{prefix}{norm}.weight" for norm in BESIDE_NORMS]


class Gemma4Router(nn.Module):
    """Gemma 4 26B-A4B's router (transformers' Gemma4TextRouter): the layer's stream (not the
    MLP's normed input) normed without a weight, times `scale` [H] and H^-0.5 in the dtype, then
    `proj` to one logit per expert; softmax in fp32, the top k renormalized, each times its
    expert's per_expert_scale."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, E = args.hidden_size, args.num_experts
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))
        self.eps, self.top_k, self.root = args.rms_norm_eps, args.num_experts_per_tok, H ** -0.5

    def forward(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat [N, H] -> (weights [N, k] fp32, chosen experts [N, k] int64)."""
        h = flat.float()
        h = (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).type_as(flat)
        probs = torch.softmax(self.proj(h * self.scale * self.root), dim=-1, dtype=torch.float32)  # [N, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[chosen], chosen


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs, make_mlp: Callable[[int], nn.Module],
                 make_expert: Callable[[int], nn.Module] | None = None):
        """make_mlp(intermediate_size): one SwiGLU MLP of that width (models/llama.MLP); make_expert:
        a routed expert, where it differs from make_mlp's (Llama 4's experts fuse gate and up, its
        shared expert does not)."""
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.weights_fp32 = args.routing_weights_fp32
        self.router = args.router
        self.input_weighted = args.experts_input_weighted  # (Llama 4)
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=args.router_bias)  # the router
        if self.router == "sigmoid":  # (loaded and kept in fp32, with the router's weight: router_params_fp32)
            self.gate.register_parameter("e_score_correction_bias",
                                         nn.Parameter(torch.zeros(args.num_experts), requires_grad=False))
        self.router_params_fp32 = args.router_params_fp32
        self.groups, self.topk_groups, self.scaling = args.router_groups, args.router_topk_groups, args.routed_scaling
        self.experts = nn.ModuleList((make_expert or make_mlp)(args.moe_intermediate_size)
                                     for _ in range(args.num_experts))
        self.has_shared = args.shared_expert_intermediate_size > 0
        self.shared_gated = self.has_shared and args.shared_expert_gated
        if self.has_shared:  # Qwen2-MoE, GLM-4.5 (its shared experts as one MLP, without a gate)
            self.shared_expert = make_mlp(args.shared_expert_intermediate_size)
        if self.shared_gated:
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)
        # Set by lora.inject_lora (lora_moe.ExpertRouting), so that each adapter's LoRA of an
        # expert applies to its own tokens among those routed there.
        self.routing_hook: RoutingHook | None = None

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat [N, H] -> (weights [N, k], chosen experts [N, k] int64), as transformers' routers
        compute them: softmax in fp32, top k, renormalized (Mixtral, norm_topk_prob), then cast
        to the dtype unless Mixtral; GPT-OSS: the top k logits, then their softmax in the dtype;
        GLM-4.5 and DeepSeek-V3: sigmoid; DeepSeek-V2: grouped softmax (below)."""
        if self.router_params_fp32:  # GLM-4.5, DeepSeek-V3: the router's weights and scores in fp32
            assert self.gate.bias is None, "an fp32 router with a bias is no family's"
            logits = F.linear(flat.float(), self.gate.weight.float())  # [N, E] fp32
        else:
            logits = self.gate(flat)  # [N, E]
        if self.router == "sigmoid":
            return self._sigmoid_route(logits)
        if self.router == "grouped_softmax":
            return self._grouped_softmax_route(logits)
        if self.router == "grouped_softmax_top2":
            return self._grouped_top2_softmax_route(logits)
        if self.router == "topk_softmax":
            top, chosen = torch.topk(logits, self.top_k, dim=-1)  # [N, k]
            return torch.softmax(top, dim=-1), chosen
        if self.router == "topk_sigmoid":  # Llama 4: sigmoid in fp32, cast to the dtype
            top, chosen = torch.topk(logits, self.top_k, dim=-1)  # [N, k]
            return torch.sigmoid(top.float()).to(logits.dtype), chosen
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_fp32:
            weights = weights.to(flat.dtype)
        return weights, chosen

    def _sigmoid_route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """DeepSeek-V3's router, as transformers' GLM-4.5 writes it: sigmoid scores; the experts
        are picked by score + correction bias, among the topk_groups groups whose two best
        such scores sum highest; their weights are the plain scores, renormalized
        (norm_topk_prob) and scaled. logits [N, E] fp32 -> (weights [N, k] fp32, experts [N, k])."""
        N, E = logits.shape
        scores = logits.sigmoid()  # [N, E]
        for_choice = scores + self.gate.e_score_correction_bias  # [N, E]
        if self.topk_groups < self.groups:
            per_group = for_choice.view(N, self.groups, E // self.groups)  # [N, G, E/G]
            keep = self._best_groups(per_group.topk(2, dim=-1)[0].sum(dim=-1))  # [N, E]
            for_choice = for_choice.masked_fill(~keep, float("-inf"))
        chosen = torch.topk(for_choice, k=self.top_k, dim=-1, sorted=False)[1]  # [N, k]
        weights = scores.gather(1, chosen)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen

    def _grouped_softmax_route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """DeepSeek-V2's router (transformers' DeepseekV2TopkRouter): softmax scores in fp32; with
        groups (topk_method group_limited_greedy), only the experts of the topk_groups groups
        whose best score is highest may be picked; the top k scores are the weights, scaled and
        never renormalized. logits [N, E] fp32 -> (weights [N, k] fp32, experts [N, k])."""
        N, E = logits.shape
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
        if self.topk_groups < self.groups:
            keep = self._best_groups(scores.view(N, self.groups, E // self.groups).amax(dim=-1))  # [N, E]
            scores = scores.masked_fill(~keep, 0.0)  # (a softmax score is > 0: a kept expert still wins)
        weights, chosen = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [N, k] each
        return weights * self.scaling, chosen

    def _grouped_top2_softmax_route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Mistral Small 4's router (transformers' Mistral4TopkRouter): softmax scores in the
        logits' dtype (the model's: no fp32 router); only the experts of the topk_groups groups
        whose two best scores sum highest may be picked; the top k scores are the weights,
        renormalized (norm_topk_prob) and scaled, in that dtype. logits [N, E] -> (weights
        [N, k], experts [N, k])."""
        N, E = logits.shape
        scores = logits.softmax(dim=-1)  # [N, E]
        for_choice = scores
        if self.topk_groups < self.groups:
            per_group = scores.view(N, self.groups, E // self.groups)  # [N, G, E/G]
            keep = self._best_groups(per_group.topk(2, dim=-1)[0].sum(dim=-1))  # [N, E]
            for_choice = scores.masked_fill(~keep, 0.0)  # (a softmax score is > 0: a kept expert still wins)
        chosen = torch.topk(for_choice, k=self.top_k, dim=-1, sorted=False)[1]  # [N, k]
        weights = scores.gather(1, chosen)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen

    def _best_groups(self, group_scores: Tensor) -> Tensor:
        """group_scores [N, G] -> [N, E] bool: the experts of each token's topk_groups best groups."""
        best = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]  # [N, g]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
        return keep.repeat_interleave(len(self.experts) // self.groups, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        B, S, H = x.shape  # x [B, S, H]
        flat = x.reshape(-1, H)  # [N, H]
        weights, chosen = self.route(flat)
        out = run_experts(self.experts, flat, weights, chosen, self.routing_hook, S, self.input_weighted).view(B, S, H)
        if self.has_shared:
            shared = self.shared_expert(x)  # [B, S, H]
            out = out + (torch.sigmoid(self.shared_expert_gate(x)) * shared if self.shared_gated else shared)
        return out
