"""One adapter's trainable state: its LoRA weights in every target module, its optimizer and
LR schedule, and saving/loading in PEFT's LoRA format."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlora import stacked_lora
from mlora.atomic import write_dir_atomically, write_file_atomically
from mlora.config import EXPERT_TARGET_MODULES, AdapterConfig, adapter_seed
from mlora.errors import INTEGER_TOO_LONG, UserError
from mlora.flat_params import FlatParameters
from mlora.lora import ALL_TARGET_MODULES, LoraLinear, LoraWeights, module_seed
from mlora.loss_scale import LossScale
from mlora.lr_schedule import lr_factor, warmup_steps
from mlora.models.naming import Naming
from mlora.pickled_weights import read_pickled_weights

# PEFT prefixes every LoRA tensor name with this (the PeftModel -> base model path).
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# PEFT's weights saved with safe_serialization=False (its default before safetensors), read
# when there is no WEIGHTS_NAME beside them, as PEFT does (saved_weights_file)
PICKLED_WEIGHTS_NAME = "adapter_model.bin"


def clip_factor(norm: torch.Tensor, limit: float) -> torch.Tensor:
    """What clipping multiplies the gradient by, on the device: limit / (norm + 1e-6) above the
    limit, else 1; norm a float64 scalar, the factor rounded to fp32 once. Exactly the
    factor Adapter.step computes on the host from the same norm."""
    # Not limit / tensor: that is tensor.reciprocal() * limit, two roundings.
    return torch.where(norm > limit, torch.full_like(norm, limit) / (norm + 1e-6), 1.0).float()


def check_rank(cfg: AdapterConfig, wrappers: dict[str, LoraLinear]) -> None:
    """Refuse an r above both sides of one of the adapter's target projections: more weights
    than the projection itself has, for a product B @ A of rank at most min(in, out) (at an
    absurd r, an allocation that fails deep inside torch). An r above the smaller side alone
    is allowed, as in PEFT: one r for every target puts r = 64 on Qwen3.5's in_proj_b and
    in_proj_a, 32 outputs wide."""
    for path in sorted(wrappers, key=lambda p: _module_sort_key(p, wrappers[p].target)):
        wrapper = wrappers[path]
        if wrapper.target in cfg.target_modules and cfg.r > max(wrapper.in_features, wrapper.out_features):
            raise UserError(f"adapter '{cfg.name}': r={cfg.r} is more than either side of {path} "
                            f"({wrapper.out_features} x {wrapper.in_features})")


class Adapter:
    """A LoRA adapter attached to the `LoraLinear` wrappers of one model (or one stage)."""

    def __init__(self, cfg: AdapterConfig, wrappers: dict[str, LoraLinear], seed: int,
                 device: torch.device, total_steps: int = 1, stage_layers: set[str] | None = None,
                 naming: Naming = Naming(), loss_scaling: bool = False, model_layers: set[str] | None = None):
        """stage_layers: on a pipeline stage, the decoder layers it holds ('model.layers.3', ...):
        an `init_from` adapter's tensors for other layers belong to other stages.
        model_layers: with stage_layers, every decoder layer of the whole model: a tensor of a
        layer outside them belongs to no stage and is refused, as one process refuses it.
        naming: the base model's own module names, which the PEFT files use (ChatGLM, Baichuan,
        Gemma 3's image-text models name theirs otherwise than mlora).
        loss_scaling: the backward runs in fp16 (loss_scale.needs_loss_scaling): the loss is
        scaled by a dynamic power of two, which the step divides out again (loss_scale.py)."""
        self.cfg = cfg
        self.loss_scale: LossScale | None = LossScale() if loss_scaling else None
        self._step_scale = 1.0  # the loss scale of the step in progress (loss_scale_for)
        self._grads_unscaled = False  # restored gradients not yet scaled (restore_from_checkpoint)
        self.naming = naming
        self.stage_layers = stage_layers
        self.model_layers = model_layers
        self.name = cfg.name
        self.total_steps = total_steps
        self.steps_done = 0
        own_seed = adapter_seed(seed, cfg.name)
        # One dropout generator per adapter and decoder layer, seeded from both: the adapter's
        # masks never depend on the other adapters, nor on which layers this process holds (a
        # pipeline stage draws for its layers what one process draws for them).
        self.dropout_generators: dict[str, torch.Generator] = {}  # decoder layer path -> generator
        self.weights: dict[str, LoraWeights] = {}
        self._named: list[tuple[str, torch.nn.Parameter]] | None = None  # named_parameters, built once
        check_rank(cfg, wrappers)
        for path in sorted(wrappers, key=lambda p: _module_sort_key(p, wrappers[p].target)):
            if wrappers[path].target not in cfg.target_modules:
                continue
            wrapper = wrappers[path]
            weights = LoraWeights(wrapper.in_features, wrapper.out_features, cfg.r, cfg.alpha,
                                  cfg.dropout, cfg.use_rslora, module_seed(own_seed, path), device)
            layer = decoder_layer_of(path)
            if layer not in self.dropout_generators:
                seed_of_layer = module_seed(own_seed ^ 0x5EED, layer)
                # (an adapter on the meta device, `mlora train --dry_run`'s, is checked and
                # never trained: torch has no meta generator, the CPU's is never drawn from)
                where = "cpu" if torch.device(device).type == "meta" else device
                self.dropout_generators[layer] = torch.Generator(device=where).manual_seed(seed_of_layer)
            weights.generator = self.dropout_generators[layer]
            wrapper.adapters[cfg.name] = weights
            wrapper.group.adapters_changed()
            self.weights[path] = weights
        if cfg.init_from:
            self.load_peft(cfg.init_from)
        # The weights as views of one fp32 buffer, which the optimizer steps (flat_params.py):
        # every A, then every B, in module order, so that the A of an input group's members
        # (q, k, v; gate, up) lie side by side, and the fused op's A of a one-adapter batch is
        # a view of the adapter's cast, not a concatenation (lora_fused.WeightCasts).
        params = self.parameters()
        self.flat: FlatParameters | None = FlatParameters(params[0::2] + params[1::2]) if params else None
        self.optimizer = self._make_optimizer()

    def generators_by_layer(self) -> dict[int, torch.Generator]:
        """{decoder layer index: this adapter's dropout generator there} (CausalLM.rng_generators)."""
        return {int(layer.rsplit(".", 1)[-1]): g for layer, g in self.dropout_generators.items()}

    # ----------------------------------------------------------------- optimisation
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """('<module path>.lora_A' | '.lora_B', parameter), in module order. Built once: the
        step asks for them several times, and building the names of hundreds of parameters
        each time is host time a GPU waits for. (The weights are set in __init__ and only
        ever changed in place.)"""
        if self._named is None:
            self._named = [(f"{path}.{kind}", getattr(w, kind)) for path, w in self.weights.items()
                           for kind in ("lora_A", "lora_B")]
        return list(self._named)

    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        cfg = self.cfg
        if self.flat is None:  # a pipeline stage where this adapter has no target module
            return None
        # One tensor: the adapter's weights as one buffer (flat_params.py), so a step is one
        # launch of the optimizer's kernel, not one per few dozen of its hundreds of tensors.
        params = [self.flat.param]
        if cfg.loraplus_lr_ratio is not None:
            # LoRA+: every B at lr * ratio, every A at lr, as PEFT's create_loraplus_optimizer
            # groups them. The buffer holds every A, then every B (__init__): its two parts, as
            # leaves sharing its storage (a write through either is a write to the weights),
            # are the two groups' one tensor each (a launch per group).
            n_a = sum(w.lora_A.numel() for w in self.weights.values())
            data = self.flat.param.detach()  # [n_A + n_B]
            params = [{"params": [torch.nn.Parameter(data[:n_a])]},
                      {"params": [torch.nn.Parameter(data[n_a:])], "lr": cfg.lr * cfg.loraplus_lr_ratio}]
        if cfg.optim == "adamw":
            # Fused (CUDA and CPU): one kernel for the whole step (the foreach default took ~7
            # ms per step for TinyLlama's 308 tensors on the H200), and it can skip a step the
            # device found non-finite without the host looking (`found_inf`, as torch.amp's
            # GradScaler uses it): see step_on_device.
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        if cfg.optim == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        raise AssertionError(f"unknown optimizer {cfg.optim!r}")

    def current_lr(self) -> float:
        """The scheduled LR of this step (LoRA+: lora_A's; lora_B's is loraplus_lr_ratio times it)."""
        return self.cfg.lr * self._lr_factor()

    def _lr_factor(self) -> float:
        cfg = self.cfg
        warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, self.total_steps)
        return lr_factor(cfg.lr_scheduler, self.steps_done, warmup, self.total_steps, cfg.lr, cfg.lr_scheduler_kwargs)

    def _flat_grad(self) -> torch.Tensor | None:
        """The adapter's gradient as one fp32 tensor, for the step (FlatParameters.gather_grad),
        None without any."""
        return None if self.flat is None else self.flat.gather_grad()

    def grad_sq(self) -> torch.Tensor | None:
        """Sum of squares of this process's part of the adapter's gradient, as an fp32 scalar
        on the device (None: no gradient here). Nothing waits for the device, and nothing the
        size of the gradient is made (the step gathers it)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return None
        # One multi-tensor kernel over hundreds of tensors; fp32, as the weights are.
        norms = torch._foreach_norm(grads)
        sq = torch.stack(norms).pow(2).sum()
        unscale = self._unscale()
        return sq if unscale == 1.0 else sq.mul_(unscale * unscale)  # (a power of two: exact)

    # ----------------------------------------------------------------- fp16 loss scaling
    def loss_scale_for(self, step_tokens: int) -> float:
        """What this adapter's loss of a step with `step_tokens` label tokens is multiplied by
        before the backward: 1, or under fp16 its dynamic loss scale (loss_scale.py), which
        the step then divides out. Asked for by every micro-batch of a step (all of them have
        the step's label-token count); call it where the gradients accumulated so far are in
        place (see _grads_unscaled)."""
        if self.loss_scale is None:
            return 1.0
        scale = self.loss_scale.for_step(step_tokens)
        if self._grads_unscaled:
            # Gradients of a half-finished step restored from a checkpoint of an mlora before
            # loss scaling (no "loss_scale" in it) were accumulated unscaled: scaled now (a
            # power of two: exact), so that the step divides one scale out of all of them.
            with torch.no_grad():
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self._grads_unscaled = False
        self._step_scale = scale
        return scale

    def _unscale(self) -> float:
        """What the gradients of the step in progress are multiplied by to undo its loss scale
        (1 / its scale: exact)."""
        return 1.0 / self._step_scale

    def update_loss_scale(self, finite: bool) -> bool:
        """After a step whose gradient norm was `finite` or not (and whose loss was finite):
        move the loss scale on. True when the non-finite gradient was an fp16 overflow that the
        scale now backs off from: the step is skipped, and it is no NaN for on_nan. False
        without loss scaling, and for a finite gradient."""
        if self.loss_scale is None:
            return False
        if finite:
            self.loss_scale.stepped()
            return False
        return self.loss_scale.back_off()

    def local_grad_sq(self) -> float:
        """grad_sq as a number (a pipeline stage adds these up over all ranks to clip by the
        adapter's whole norm); reading it waits for the device."""
        sq = self.grad_sq()
        return 0.0 if sq is None else sq.item()

    def grad_norm(self) -> float:
        """L2 norm of this adapter's whole gradient (on this process)."""
        return math.sqrt(self.local_grad_sq())

    def step(self, grad_norm: float | None = None) -> tuple[float, float]:
        """Clip, take one optimizer step at the scheduled LR, zero the gradients.

        `grad_norm` is the adapter's whole gradient norm when this process holds only a part
        of it (a pipeline stage); by default it is computed here. Returns (lr, grad_norm).
        """
        norm = self.grad_norm() if grad_norm is None else grad_norm  # (unscaled: grad_sq)
        grad = self._flat_grad()  # (a pipeline stage may hold none of this adapter's tensors)
        factor = self._unscale()
        if self.cfg.max_grad_norm is not None and norm > self.cfg.max_grad_norm:
            factor *= self.cfg.max_grad_norm / (norm + 1e-6)
        if factor != 1.0 and grad is not None:
            grad.mul_(factor)
        lr = self.current_lr()
        if self.optimizer is not None:
            self._set_lr()
            self._optimizer_step(grad)
        self.steps_done += 1
        return lr, norm

    @property
    def steps_on_device(self) -> bool:
        """Whether step_on_device can run: the optimizer skips a step on the device's word
        (fused AdamW reads `found_inf`; SGD's fused kernel leaves a skipped first step's
        momentum buffer uninitialised, so it keeps the host's decision)."""
        return (isinstance(self.optimizer, torch.optim.AdamW)
                and all(group.get("fused") for group in self.optimizer.param_groups))

    def step_on_device(self, bad: torch.Tensor | None = None,
                       sq: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """`step` without reading anything back from the device, so the host never waits for
        it between two fused batches (on a GPU that wait idles the GPU for as long as the host
        then takes to queue the next work). The clipping factor is computed on the device,
        and a non-finite gradient norm, or `bad` (a device bool scalar: e.g. the step's loss
        is non-finite), makes the optimizer skip the step there: weights, moments and its
        step count stay as they were. The gradients are zeroed and steps_done moves on either
        way, as `skip_step` does; the caller reads the norm later and logs the skip.

        The same arithmetic as `step`: the norm's square summed in fp32, its root and the
        factor in float64, the factor rounded to fp32 once, applied only above the limit.
        `sq`: grad_sq() of the current gradients, when the caller has it already.
        Returns (lr, the squared gradient norm as a device scalar, or None without gradients)."""
        assert self.steps_on_device, "step_on_device needs the fused AdamW optimizer"
        if sq is None:
            sq = self.grad_sq()
        lr = self.current_lr()
        if sq is not None:
            grad = self._flat_grad()
            skip = ~torch.isfinite(sq)
            if bad is not None:
                skip = skip | bad
            limit, unscale = self.cfg.max_grad_norm, self._unscale()
            if limit is not None:
                factor = clip_factor(sq.double().sqrt(), limit)  # (sq is unscaled: grad_sq)
                grad.mul_(factor if unscale == 1.0 else factor.mul_(unscale))
            elif unscale != 1.0:
                grad.mul_(unscale)
            self._set_lr()
            self.optimizer.found_inf = skip.float()
            try:
                self._optimizer_step(grad)
            finally:
                del self.optimizer.found_inf
        self.steps_done += 1
        return lr, sq

    def _optimizer_step(self, grad: torch.Tensor | None) -> None:
        """Step the weights by `grad` (_flat_grad(); None: no gradient here, no step). A weight
        without a gradient of its own steps with a zero one: an MoE expert's LoRA when the
        expert got none of the adapter's tokens. Whether it got any may depend on the other
        adapters of a fused batch (they set how far the adapter's rows are padded, and pad
        tokens are routed too: with a zero gradient), so without that the optimizer
        (momentum, AdamW's moments, weight decay) would step such a weight in a fused batch
        and leave it alone in a solo run. So every step moves every weight, as PEFT on
        transformers 5's stacked experts does."""
        if grad is not None:
            # the buffer, or LoRA+'s A part and B part of it (_make_optimizer): grad's parts, in order
            stepped = [group["params"][0] for group in self.optimizer.param_groups]
            for p, part in zip(stepped, grad.split([p.numel() for p in stepped])):
                p.grad = part
            self.optimizer.step()
            for p in stepped:
                p.grad = None
            # The optimizer writes the weights through the flat buffer, which moves none of
            # the parameters' version counters (nor does torch's _fused_adamw_ move its own),
            # and the fused LoRA op keeps its casts of the weights until a version moves
            # (lora_fused.WeightCasts, flat_params.cast_of): without this, every forward after
            # the first step would run on the first step's weights.
            torch.autograd.graph.increment_version(self.parameters())
        self.optimizer_zero_grad()

    def _set_lr(self) -> None:
        """Each group at its base rate times the schedule's factor, as a LambdaLR sets it: lr
        (current_lr), and under LoRA+ the B group's lr * ratio times the factor."""
        factor = self._lr_factor()
        ratio = self.cfg.loraplus_lr_ratio
        bases = [self.cfg.lr] if ratio is None else [self.cfg.lr, self.cfg.lr * ratio]
        for group, base in zip(self.optimizer.param_groups, bases):
            group["lr"] = base * factor

    def optimizer_zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None
        if self.flat is not None:
            self.flat.forget_grad()

    def skip_step(self) -> None:
        """Drop this step's gradients; the LR schedule still moves on (the data was used)."""
        self.optimizer_zero_grad()
        self.steps_done += 1

    # ----------------------------------------------------------------- resumable state
    def state_for_checkpoint(self) -> dict:
        """Everything that makes the rest of the run exact: weights, gradients accumulated so
        far in the current step, optimizer state, step count and the dropout RNG."""
        return {
            "params": {n: p.detach().cpu().clone() for n, p in self.named_parameters()},
            "grads": {n: p.grad.detach().cpu().clone() for n, p in self.named_parameters() if p.grad is not None},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "steps_done": self.steps_done,
            "generators": {layer: g.get_state() for layer, g in self.dropout_generators.items()},
            # (with the step in progress's scale, which its gradients so far carry, or whether they
            # are still the unscaled ones of an older checkpoint: _grads_unscaled)
            "loss_scale": None if self.loss_scale is None else {
                **self.loss_scale.state(), "step_scale": self._step_scale, "grads_unscaled": self._grads_unscaled},
        }

    def restore_from_checkpoint(self, saved: dict) -> None:
        params = dict(self.named_parameters())
        if set(saved["params"]) != set(params):
            raise UserError(f"checkpoint: adapter '{self.name}' has different LoRA modules than the config")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["params"][name])
                p.grad = saved["grads"][name].to(p.device).clone() if name in saved["grads"] else None
        if self.optimizer is not None and saved["optimizer"] is not None:
            # (a checkpoint of an mlora before flat_params.py has a state per weight; not one of
            # LoRA+, which came after it: its state is the A part's and the B part's, as saved)
            optimizer_state = saved["optimizer"]
            if self.cfg.loraplus_lr_ratio is None:
                optimizer_state = self.flat.flat_optimizer_state(optimizer_state, self.parameters())
            self.optimizer.load_state_dict(optimizer_state)
            if isinstance(self.optimizer, torch.optim.AdamW):
                # A checkpoint of an older mlora stepped the CPU's AdamW unfused, and loading
                # its state brings that setting back: step as this mlora does.
                for group in self.optimizer.param_groups:
                    group["fused"], group["foreach"] = True, None
        self.steps_done = saved["steps_done"]
        if "generators" not in saved or set(saved["generators"]) != set(self.dropout_generators):
            raise UserError(f"checkpoint: adapter '{self.name}' has other dropout generators than this mlora draws "
                            "from (one per decoder layer; a checkpoint of an older mlora cannot be resumed)")
        for layer, g in self.dropout_generators.items():
            g.set_state(saved["generators"][layer])
        if self.loss_scale is not None:
            if saved.get("loss_scale") is not None:
                self.loss_scale = LossScale.from_state(saved["loss_scale"])
                self._step_scale = saved["loss_scale"]["step_scale"]
                self._grads_unscaled = saved["loss_scale"].get("grads_unscaled", False)
            else:  # (a checkpoint of an mlora before loss scaling, or of a run without it)
                self._grads_unscaled = bool(saved["grads"])

    # ----------------------------------------------------------------- PEFT format
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        tensors, per_expert = {}, {}
        for path, w in self.weights.items():
            # copies: on the CPU the weights are views of one buffer (flat_params.py), which
            # safetensors refuses to save as separate tensors. A meta-device adapter's (shapes
            # only: `mlora train --dry_run` checks an init_from against them) stay there.
            where = "meta" if w.lora_A.is_meta else "cpu"
            a, b = (t.detach().to(where, torch.float32, copy=True) for t in (w.lora_A, w.lora_B))
            if path in self._stacked:  # stacked experts: one LoRA per stacked parameter (stacked_lora.py)
                per_expert[path] = (a, b)
                continue
            tensors[self._peft_key(path, "lora_A")], tensors[self._peft_key(path, "lora_B")] = a, b
        for module, (a, b) in stacked_lora.stack(per_expert, self._stacked, self._swapped).items():
            tensors[self._peft_key(module, "lora_A")], tensors[self._peft_key(module, "lora_B")] = a, b
        return tensors

    @functools.cached_property
    def _stacked_projections(self) -> list[str]:
        """The experts' projections whose LoRA PEFT holds per stacked parameter (target_parameters):
        GPT-OSS's gate_up_proj and down_proj where targeted; Gemma 4 26B-A4B's and Llama 4's where
        experts.gate_up_proj, experts.down_proj are (their plain names are their dense MLPs')."""
        targets = self.cfg.target_modules
        if self.naming.stacks_experts:
            return [p for p in stacked_lora.STACKED_PROJECTIONS if p in targets]
        return [p for p in stacked_lora.STACKED_PROJECTIONS if f"experts.{p}" in targets]

    @property
    def _swapped(self) -> bool:
        """Whether PEFT's stacked LoRA of these experts trades A and B (Llama 4's: stacked_lora.SWAPPED)."""
        return self.naming.family in stacked_lora.SWAPPED

    @functools.cached_property
    def _stacked(self) -> dict[str, str]:
        """{expert projection path: PEFT's module path of the stacked LoRA it is part of} where
        PEFT stacks the experts' LoRA (GPT-OSS, Gemma 4 26B-A4B, Llama 4); else empty."""
        if not self._stacked_projections:
            return {}
        modules = {path: stacked_lora.peft_module(path, self._stacked_projections) for path in self.weights}
        return {path: module for path, module in modules.items() if module is not None}

    def _peft_key(self, path: str, kind: str) -> str:
        """PEFT's name of a LoRA weight: the module path in the base's own model (naming.to_module)."""
        return f"{PEFT_PREFIX}{self.naming.to_module(path)}.{kind}.weight"

    def peft_config(self, base_model: str) -> dict:
        cfg = self.cfg
        # GPT-OSS's, Gemma 4 26B-A4B's and Llama 4's experts are parameters to PEFT (target_parameters), not modules
        stacked = self._stacked_projections
        targets = [m for m in cfg.target_modules if m not in EXPERT_TARGET_MODULES
                   and not (self.naming.stacks_experts and m in stacked_lora.STACKED_PROJECTIONS)]
        # (the experts' module in a decoder layer, as transformers names it: Gemma 4's beside the dense MLP)
        experts = ("mlp.experts" if self.naming.stacks_experts
                   else "feed_forward.experts" if self._swapped else "experts")
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            # (none: an adapter on the experts alone; an image-text model's pattern would match nothing either)
            "target_modules": self.naming.peft_target_modules(targets) if targets else [],
            **({"target_parameters": stacked_lora.target_parameters(stacked, experts)} if stacked else {}),
            "use_rslora": cfg.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }

    def save(self, directory: str | os.PathLike, base_model: str) -> Path:
        """Write adapter_model.safetensors + adapter_config.json into `directory`, each file
        atomically (temporary file, then rename), so a reader never sees half a file."""
        return save_peft(directory, self.peft_state_dict(), self.peft_config(base_model))

    def load_peft(self, directory: str | os.PathLike, label: str = "init_from") -> None:
        """Copy weights from a PEFT LoRA directory into this adapter (`init_from`, or `label`
        "adapter" for a trained adapter that eval loads). Its r, lora_alpha and use_rslora
        must be the config's: they set the scale the weights were trained with, and using
        another would silently compute something else."""
        directory = Path(directory)
        where = f"{label} {directory}"
        peft_cfg = read_peft_config(directory)
        saved = {"r": peft_cfg["r"], "alpha": peft_cfg["lora_alpha"], "use_rslora": peft_cfg["use_rslora"]}
        for key, mine in (("r", self.cfg.r), ("alpha", self.cfg.alpha), ("use_rslora", self.cfg.use_rslora)):
            if saved[key] != mine:
                peft_key = "lora_alpha" if key == "alpha" else key
                raise UserError(f"{where}: its {peft_key} is {saved[key]}, but adapter '{self.name}' has "
                                f"{key}={mine} in the config (they must match)")
        tensors = read_peft_weights(directory)
        if self.naming.family in ("qwen3_5", "qwen3_5_moe"):
            # (an adapter trained on Qwen3.5's image-text model names its modules
            # model.language_model.*; mlora's are the text model's: naming.from_module)
            tensors = {PEFT_PREFIX + self.naming.from_module(k[len(PEFT_PREFIX):]) if k.startswith(PEFT_PREFIX)
                       else k: v for k, v in tensors.items()}
        # bias="all" / "lora_only": PEFT puts the trained biases saved here in place of the base's
        # (every rank of a pipeline refuses, whichever layer the bias is of)
        bias = next((name for name in sorted(tensors) if name.endswith(".bias")), None)
        if bias is not None:
            raise UserError(f"{saved_weights_file(directory)}: tensor {bias} is a trained bias of the base model "
                            f"(its bias is {peft_cfg.get('bias', 'none')!r}), which mlora does not support")
        expected = self.peft_state_dict()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            # mlora puts an adapter on every module of its target_modules, in every layer
            left_out = [key for key in ("layers_to_transform", "exclude_modules") if peft_cfg.get(key)]
            why = (f"its {' or '.join(left_out)} left it out, and mlora adapts every target module of every layer"
                   if left_out else self._targets_must_match(peft_cfg))
            raise UserError(f"{where}: tensor {missing[0]} is missing ({why})")
        for name, value in tensors.items():
            if name not in expected:
                module = self.naming.from_module(name[len(PEFT_PREFIX):].rsplit(".", 2)[0])  # no '.lora_A.weight'
                layer = _LAYER_PATH.match(module)  # None: not a decoder layer's (an lm_head's LoRA)
                if (self.stage_layers is not None and layer is not None and layer[0] not in self.stage_layers
                        and (self.model_layers is None or layer[0] in self.model_layers)):
                    continue  # another pipeline stage's layer: that stage loads it
                raise UserError(f"{where}: unexpected tensor {name} ({self._targets_must_match(peft_cfg)})")
            if value.shape != expected[name].shape:
                raise UserError(f"{where}: tensor {name} has shape {tuple(value.shape)}, expected "
                                f"{tuple(expected[name].shape)} (was it trained on another base model?)")
            if has_non_finite(value):  # every step would be skipped, or every output NaN
                raise UserError(f"{where}: tensor {name} has non-finite values (NaN or inf)")
        with torch.no_grad():
            for path, w in self.weights.items():
                if path in self._stacked:  # one expert's part of a stacked LoRA
                    module = self._stacked[path]
                    a, b = tensors[self._peft_key(module, "lora_A")], tensors[self._peft_key(module, "lora_B")]
                    a, b = stacked_lora.unstack(a, b, stacked_lora.split_path(path)[1], a.shape[0] // w.lora_A.shape[0],
                                                self._swapped)
                else:
                    a, b = tensors[self._peft_key(path, "lora_A")], tensors[self._peft_key(path, "lora_B")]
                w.lora_A.copy_(a)
                w.lora_B.copy_(b)

    def _targets_must_match(self, peft_cfg: dict) -> str:
        """What load_peft says of an adapter whose tensors are of other modules than the
        config's target_modules: both sides, so that an adapter trained under another config
        (its target_modules changed since) is seen as such, not as a damaged file."""
        saved = peft_cfg.get("target_modules")  # (PEFT writes a set: in no order)
        shown = ", ".join(sorted(map(str, saved))) if isinstance(saved, list) else repr(saved)
        return (f"the adapter's target_modules must match: its {CONFIG_NAME} has {shown}, adapter "
                f"'{self.name}' has {', '.join(sorted(self.cfg.target_modules))} in the config")

    def detach_from(self, wrappers: dict[str, LoraLinear]) -> None:
        """Remove this adapter from the model (its weights stay in `self.weights`), and from
        what the input groups keep of it (InputGroup.forget_weights)."""
        for path in self.weights:
            wrapper = wrappers[path]
            wrapper.adapters.pop(self.name, None)
            wrapper.group.forget_weights()


def decoder_layer_of(path: str) -> str:
    """'model.layers.3' for 'model.layers.3.self_attn.q_proj' or 'model.layers.3.mlp.experts.5.up_proj'
    (a target's decoder layer)."""
    m = _LAYER_PATH.match(path)
    if m is None:
        raise ValueError(f"{path!r} is not a module of a decoder layer")
    return m[0]


_LAYER_PATH = re.compile(r"^.*?\blayers\.\d+")


def layer_generators(adapters) -> dict[int, list[torch.Generator]]:
    """{decoder layer index: every adapter's dropout generator there}: what a recomputed layer
    must replay (CausalLM.rng_generators)."""
    out: dict[int, list[torch.Generator]] = {}
    for adapter in adapters:
        for i, g in adapter.generators_by_layer().items():
            out.setdefault(i, []).append(g)
    return out


def _module_sort_key(path: str, leaf: str) -> tuple:
    """Order module paths by layer number, then by the canonical target order of their target
    names (leaf: LoraLinear.target; Gemma 4's and Llama 4's experts.gate_up_proj, ... after the
    MLP's)."""
    parts = path.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]  # the layer's, then an expert's
    return (numbers[:1] or [-1], ALL_TARGET_MODULES.index(leaf) if leaf in ALL_TARGET_MODULES else 99,
            numbers[1:], path)


def adapter_files_digest(directory: str | os.PathLike) -> str:
    """A digest of what an adapter directory's two PEFT files hold, its weights being the file
    read_peft_weights reads (a file that cannot be read counts as its error): pipeline ranks
    compare their copies of the same adapter by it."""
    import hashlib

    h = hashlib.sha256()
    for name in (saved_weights_file(directory).name, CONFIG_NAME):
        try:
            with open(Path(directory) / name, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as err:  # loading it says what is wrong, in one line
            h.update(f"unreadable {name}: {err.strerror}".encode())
    return h.hexdigest()[:16]


def save_peft(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # (clean: the training run, under the output directory's lock, is their only writer)
    write_file_atomically(directory / WEIGHTS_NAME,
                          lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), clean=True)
    write_file_atomically(directory / CONFIG_NAME,
                          lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"), clean=True)
    return directory


BEST_DIR = "best"  # <output_dir>/<adapter>/best: the weights of the lowest eval loss (save_best)


def checkpoint_dir_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` directory name as save_step's saves write it
    (<output_dir>/<adapter>/checkpoint-<step>, step from 1, no leading zero), else None."""
    match = re.fullmatch(r"checkpoint-([1-9][0-9]*)", name)
    return int(match[1]) if match else None


def is_snapshot_name(name: str) -> bool:
    """<adapter>/best or <adapter>/checkpoint-<step>: the directories save_checkpoint_dir writes."""
    return name == BEST_DIR or checkpoint_dir_step(name) is not None


def save_checkpoint_dir(target: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write a whole PEFT directory under a temporary name, then rename it into place. The
    temporaries of earlier snapshots of this adapter whose writer was killed go first (only
    the training run, which holds the output directory's lock, writes them)."""
    return write_dir_atomically(target, lambda tmp: save_peft(tmp, tensors, config), clean=is_snapshot_name)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` may be a directory save_checkpoint_dir wrote (mlora marks it no other
    way): a directory, not a link, holding nothing but its two PEFT files (every mlora wrote
    these two and no more), or one of them or none (what a deletion cut short left). A PEFT
    save_pretrained's has a README.md too. What fails this is someone else's and must not be
    deleted."""
    return not path.is_symlink() and path.is_dir() and not not_checkpoint_files(path)


def not_checkpoint_files(path: Path) -> list[str]:
    """The names in directory `path` that save_checkpoint_dir does not write there, sorted: any
    but its two PEFT files, and those two where they are not plain files."""
    return sorted(e.name for e in path.iterdir()
                  if e.name not in (CONFIG_NAME, WEIGHTS_NAME) or e.is_symlink() or not e.is_file())


# LoraConfig fields with which PEFT computes on the base what plain LoRA weights on mlora's target
# modules do not: each refused (read silently as plain LoRA before, or refused as a tensor of no
# target). Harmless ones, tested equal to PEFT (tests/test_peft_fields.py): fan_in_fan_out (PEFT
# resets it on nn.Linear), lora_dropout (off at inference; init_from trains with the config's),
# use_qalora (GPTQ layers only: plain LoRA on any other base), target_parameters on a Linear's
# weight, ensure_weight_tying (it ties only what these refuse). layers_to_transform,
# exclude_modules and `bias` show in the tensors, and are refused there (load_peft).
_UNSUPPORTED_FIELDS = {
    "layer_replication": "PEFT runs the base's decoder layers repeated or reordered as it lists them",
    "alora_invocation_tokens": "an activated LoRA (aLoRA) acts only from its invocation tokens on",
    "lora_bias": "each lora_B has a trained bias",
    "modules_to_save": "whole modules of the base (e.g. lm_head, embed_tokens) are replaced by trained copies",
    "trainable_token_indices": "rows of the token embedding are trained",
    "arrow_config": "Arrow routes each token among several LoRA adapters",
    "kasa_config": "KaSA truncates the base weights' smallest singular values and scales each rank",
    "use_bdlora": "BD-LoRA's A or B is block-diagonal",
    # (at inference these two are plain LoRA, but their trained state has no place in mlora's training)
    "velora_config": "VeLoRA trains with a projection of its own (saved beside the weights)",
    "monteclora_config": "MonteCLoRA trains with a sampler of its own (saved beside the weights)",
}


def read_peft_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: malformed JSON ({err})") from None
    except ValueError:  # (after those two, ValueErrors too) Python's cap on an integer's digits
        raise UserError(f"{path}: {INTEGER_TOO_LONG}") from None
    except RecursionError:  # json's decoder recurses per level: ~1000 nested brackets end the stack
        raise UserError(f"{path}: JSON nested too deeply to read") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    # The fields that set what the weights compute, checked and normalised (PEFT's defaults).
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha", 8), cfg.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise UserError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    if not isinstance(rslora, bool):
        raise UserError(f"{path}: 'use_rslora' must be true or false, got {rslora!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UserError(f"{path}: per-module {key} is not supported (one r and lora_alpha per adapter)")
    # Read silently before: weights of these compute something else on the base as it is.
    if cfg.get("use_dora"):
        raise UserError(f"{path}: a DoRA adapter (use_dora) is not supported")
    for key, what in _UNSUPPORTED_FIELDS.items():
        if cfg.get(key):
            raise UserError(f"{path}: {key} is set: {what}, which mlora does not support")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and (init.lower().startswith("pissa") or init.lower() in ("corda", "olora", "lora_ga")):
        # PEFT rebuilds the change to the base weights these made when it loads such an adapter
        raise UserError(f"{path}: init_lora_weights is {init!r}, which changes the base model's weights; convert it "
                        f"to a plain LoRA adapter first (PEFT: save_pretrained with "
                        f"path_initial_model_for_weight_conversion)")
    if isinstance(init, str) and init.lower() == "loftq":
        # LoftQ replaced each target's base weight by a quantized W - BA; PEFT has no conversion
        raise UserError(f"{path}: init_lora_weights is {init!r}: a LoftQ adapter is right only on the base weights "
                        f"LoftQ replaced, not on the original base, and PEFT cannot convert it to a plain LoRA "
                        f"adapter")
    return {**cfg, "r": r, "lora_alpha": float(alpha), "use_rslora": rslora}


def has_non_finite(value: torch.Tensor) -> bool:
    """Whether a saved tensor holds a NaN or an inf. torch has no isfinite for its 8-bit floats
    (float8_e4m3fn, float8_e5m2...): an adapter saved in one ended eval, generate and init_from
    with a NotImplementedError traceback, where PEFT reads it (copied into its fp32 weights, as
    mlora then copies it too)."""
    if value.is_floating_point() and value.element_size() == 1:
        value = value.float()
    return not bool(torch.isfinite(value).all())


def has_saved_weights(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an adapter's weights, for eval and generate (the adapters they
    load, the others being the bare base's): adapter_model.safetensors, or whatever sits under
    that name, or PEFT's pickled adapter_model.bin. Reading then works or says in one line why
    not; a .bin adapter, or a directory by that name, used to count as nothing saved: eval gave
    the bare base's loss, told "nothing saved", and generate said to train it first."""
    return os.path.lexists(saved_weights_file(directory))


def saved_weights_file(directory: str | os.PathLike) -> Path:
    """The file of an adapter directory that holds its weights, as PEFT picks it: its
    adapter_model.safetensors when anything is under that name (a directory there is refused
    in reading, not passed over), else its pickled adapter_model.bin when anything is under
    that name, else the adapter_model.safetensors that is not there."""
    directory = Path(directory)
    if not os.path.lexists(directory / WEIGHTS_NAME) and os.path.lexists(directory / PICKLED_WEIGHTS_NAME):
        return directory / PICKLED_WEIGHTS_NAME
    return directory / WEIGHTS_NAME


def read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} of an adapter directory's weights (saved_weights_file), or a
    UserError naming the file."""
    path = saved_weights_file(directory)
    if not path.is_file():
        raise UserError(f"{directory}: no {WEIGHTS_NAME} (nor {PICKLED_WEIGHTS_NAME})" if not os.path.lexists(path)
                        else f"{path} is not a file (an adapter's weights)")
    if path.name == PICKLED_WEIGHTS_NAME:
        return read_pickled_weights(path)
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: cannot read ({err})") from None
