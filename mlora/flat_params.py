"""One adapter's LoRA weights as views of one fp32 buffer, so that the optimizer, the gradient
clipping and the cast to the activation dtype each run over the adapter as one tensor.

Why. An adapter has an A and a B per target module: 308 tensors on TinyLlama (7 targets x 22
layers). torch's fused AdamW steps a list of tensors in launches of at most 36 tensors
(multi_tensor_apply's limit for its four lists), one block per 64 K values, so 308 small
tensors took 9 launches of a few dozen blocks each per adapter: 3.6 ms of a TinyLlama step
for 4 adapters on the H200 (benchmarks/results/profile_copyfix.txt), where the values'
traffic (4 x 12.6 M fp32 values, about 28 bytes each) takes about 0.3 ms. The clipping's
per-tensor norms and scaling were launches of the same kind. And the fused LoRA op cast its
group's weights to the activation dtype after every step: a cast per weight kind and group,
11 launches per LLaMA layer. Here:

* every LoRA parameter's data is a view of `param` (one fp32 tensor, laid out in the order
  the parameters are given: Adapter gives every A, then every B); the parameters stay what
  every other part of mlora sees (autograd, the kernels, saving, loading, PEFT export);
* the optimizer steps `param` (under LoRA+ its A part and its B part, two leaves sharing its
  storage: Adapter._make_optimizer), whose gradient is the parameters' gradients gathered into one
  tensor at step time (`gather_grad`: one concatenation), so the AdamW step and the clipping
  are one kernel each (the norm, asked for before the step, stays per tensor: one
  multi-tensor launch per 110 of them);
* `cast_of(p, dtype)` is p in the activation dtype as a view of ONE cast of the whole buffer,
  made again when a parameter has changed since (its version counter moved: an optimizer
  step, a restore, any in-place write), so a step's casts cost one launch per adapter.

`param` shares the parameters' storage but not their version counters (a `.data` view never
does): whoever writes `param` in place (the optimizer) must move the parameters' versions, as
Adapter._optimizer_step does, or `cast_of` would return the old weights.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

# id(parameter) -> (a weak reference to it, one to its FlatParameters, its index there). Weak
# both ways: a dropped adapter's parameters and buffer go with it (a strong FlatParameters
# here would hold every parameter through `params`, and so every adapter ever built); a
# parameter's entry goes when it does, and an entry counts only for the very parameter it
# names (ids are reused), so a deep copy of a model does not find the original's buffer.
# A plain dict: the fused op asks for every weight of a batch each step (about 1,200 at 4
# adapters on TinyLlama), where a WeakIdKeyDictionary lookup costs a few µs of host time.
_OWNER: dict[int, tuple[weakref.ref, weakref.ref, int]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _OWNER.get(key)
    if entry is not None and entry[0] is ref:
        del _OWNER[key]


class FlatParameters:
    """The fp32 parameters `params` (one device), re-homed as views of one buffer `param`."""

    def __init__(self, params: list[nn.Parameter]):
        if not params:
            raise ValueError("no parameters to flatten")
        device = params[0].device
        if any(p.dtype != torch.float32 or p.device != device for p in params):
            raise ValueError("the parameters must all be fp32 on one device")
        self.params = list(params)
        data = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32, device=device)
        with torch.no_grad():
            for p, view in zip(self.params, _unflatten_dense_tensors(data, self.params)):
                view.copy_(p)
                p.data = view
        self.param = nn.Parameter(data)  # [total]: what the optimizer steps
        me = weakref.ref(self)
        for i, p in enumerate(self.params):
            key = id(p)
            _OWNER[key] = (weakref.ref(p, lambda ref, key=key: _forget(key, ref)), me, i)
        self._cast: torch.Tensor | None = None  # [total] in _cast.dtype
        self._cast_views: list[torch.Tensor] = []  # each parameter's part of _cast, in its shape
        self._cast_versions: list[int] = []

    # ----------------------------------------------------------------- the activation-dtype cast
    def cast_of_index(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        p = self.params[i]
        if dtype == torch.float32:
            return p.detach()
        if self._cast is None or self._cast.dtype != dtype or self._cast_versions[i] != p._version:
            with torch.no_grad():
                self._cast = self.param.detach().to(dtype)  # one launch for the whole adapter
            # every parameter's view at once, in C++ (a slice and a view each from Python cost
            # about 3x the host time, ~1 ms per adapter and step for TinyLlama's 308)
            self._cast_views = _unflatten_dense_tensors(self._cast, self.params)
            self._cast_versions = [q._version for q in self.params]
        return self._cast_views[i]

    # ----------------------------------------------------------------- the gradient
    def gather_grad(self) -> torch.Tensor | None:
        """The parameters' gradients as one fp32 [total] tensor laid out like `param` (zeros for
        a parameter without one, as an optimizer step of PEFT's stacked experts gives every
        weight), or None when none has a gradient: one concatenation, made by the step itself
        (Adapter.step, step_on_device), which drops the parameters' gradients right after. (Made any
        earlier, for the norm, it would hold the gradient twice until the step: a pipeline
        stage reads the norm, then runs other micro-batches; and re-homing the 308 gradients
        as views of it instead costs more host time than the launches it saves.)"""
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return None
        # (one zeros for every parameter without a gradient: on an MoE model, the experts an
        # adapter's tokens missed can be hundreds)
        missing = max((p.numel() for p, g in zip(self.params, grads) if g is None), default=0)
        with torch.no_grad():
            zeros = torch.zeros(missing, dtype=torch.float32, device=self.param.device)
            return torch.cat([zeros[:p.numel()] if g is None else g.reshape(-1)
                              for p, g in zip(self.params, grads)])  # [total]

    def forget_grad(self) -> None:
        """Drop the stepped gradient (after a step, or when the parameters' gradients go)."""
        self.param.grad = None

    # ----------------------------------------------------------------- optimizer state
    def flat_optimizer_state(self, saved: dict, order: list[torch.Tensor]) -> dict:
        """An optimizer state_dict saved by an mlora that stepped each parameter on its own
        (one entry per parameter, those of `order` in that order) as one for `param`: tensors
        the size of their parameter concatenated in this buffer's layout (zeros where a
        parameter had no state yet), the rest (AdamW's step count, the same for all) taken
        from the first that has it. A state_dict that already has one parameter is returned
        as it is."""
        groups = saved["param_groups"]
        ids = [i for group in groups for i in group["params"]]
        if len(ids) == 1 or len(ids) != len(self.params):
            return saved
        by_param = {id(p): saved["state"].get(i, {}) for i, p in zip(ids, order)}
        states = [by_param.get(id(p), {}) for p in self.params]
        keys = {k for state in states for k in state}
        merged = {}
        for key in sorted(keys):
            values = [state.get(key) for state in states]
            if all(v is None or (torch.is_tensor(v) and v.numel() == p.numel() and v.dim() > 0)
                   for v, p in zip(values, self.params)):
                merged[key] = torch.cat([torch.zeros(p.numel()) if v is None else v.detach().float().cpu().reshape(-1)
                                         for v, p in zip(values, self.params)])
            else:
                first = next(v for v in values if v is not None)
                merged[key] = first.clone() if torch.is_tensor(first) else first
        group = {k: v for k, v in groups[0].items() if k != "params"}
        return {"state": {0: merged} if merged else {}, "param_groups": [{**group, "params": [0]}]}


def owner_of(p: torch.Tensor) -> tuple[FlatParameters, int] | None:
    """The FlatParameters p is part of, and its index there; None if it is not flattened."""
    entry = _OWNER.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    flat = entry[1]()
    return None if flat is None else (flat, entry[2])


def cast_of(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p (a LoRA parameter) in `dtype`, without autograd: a view of its adapter's one cast when
    it is flattened, else its own cast."""
    owner = owner_of(p)
    if owner is None:
        return p.detach().to(dtype)
    flat, i = owner
    return flat.cast_of_index(i, dtype)
