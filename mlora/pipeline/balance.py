"""Which modules each pipeline rank owns.

The module sequence is m-LoRA's: embedding, each decoder layer, final norm, LM head — a
32-layer model has 35 modules. `--balance` gives each rank's count, in that order; a balance
that counts decoder layers only is accepted too (the embedding then goes with the first rank,
norm and head with the last). Without `--balance` the split minimises the most expensive stage.
"""

from __future__ import annotations

from mlora.errors import UserError
from mlora.plural import counted


def split_by_balance(modules: list[str], num_layers: int, balance: list[int]) -> list[list[str]]:
    if any(n < 1 for n in balance):
        raise UserError(f"--balance {' '.join(map(str, balance))}: every rank needs at least one module")
    total = sum(balance)
    if total == len(modules):
        stages, start = [], 0
        for n in balance:
            stages.append(modules[start:start + n])
            start += n
        return stages
    if total == num_layers:
        layers = [m for m in modules if m.startswith("layer.")]
        head = [m for m in modules if not m.startswith("layer.")]
        embed = [m for m in head if m == "embed"]
        tail = [m for m in head if m != "embed"]
        stages, start = [], 0
        for n in balance:
            stages.append(layers[start:start + n])
            start += n
        stages[0] = embed + stages[0]
        stages[-1] = stages[-1] + tail
        return stages
    raise UserError(
        f"--balance {' '.join(map(str, balance))} sums to {total}; expected {len(modules)} "
        f"(embedding + {counted(num_layers, 'decoder layer')} + norm + head) or {num_layers} (decoder layers only)")


def module_costs(modules: list[str], hidden: int, intermediate: int, vocab: int,
                 num_heads: int, num_kv_heads: int, head_dim: int,
                 mlp_widths: dict[int, int] | None = None, attention: int | None = None,
                 attention_of: dict[int, int] | None = None) -> list[float]:
    """Relative cost of each module: matmul parameters touched per token (the embedding is a
    lookup, the norm nearly free). mlp_widths: the MLP width a token goes through in a layer
    where it is not `intermediate` (a mixture-of-experts layer: its k experts' widths summed,
    plus a shared expert's and the router's share), by layer index. attention: a layer's
    attention parameters where they are not q/k/v/o's (DeepSeek-V3's latent attention);
    attention_of: by layer index where a layer's differ from that (Qwen3.5's linear attention)."""
    if attention is None:
        attention = hidden * head_dim * (2 * num_heads + 2 * num_kv_heads)
    mlp_widths, attention_of = mlp_widths or {}, attention_of or {}
    layer = float(attention + 3 * hidden * intermediate)
    costs = []
    for m in modules:
        if m.startswith("layer."):
            i = int(m.split(".")[1])
            costs.append(float(attention_of.get(i, attention) + 3 * hidden * mlp_widths.get(i, intermediate)))
        elif m == "head":
            costs.append(float(hidden * vocab))
        else:  # embed, norm
            costs.append(0.01 * layer)
    return costs


def split_by_cost(modules: list[str], costs: list[float], world_size: int) -> list[list[str]]:
    """Contiguous split into `world_size` non-empty stages minimising the largest stage cost
    (exact dynamic programme; the module count is small)."""
    n = len(modules)
    if world_size > n:
        raise UserError(f"{world_size} ranks but the model has only {n} modules to split")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest possible max-stage cost putting modules[:i] on k stages.
    best = [[inf] * (n + 1) for _ in range(world_size + 1)]
    cut = [[0] * (n + 1) for _ in range(world_size + 1)]
    best[0][0] = 0.0
    for k in range(1, world_size + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    stages, i = [], n
    for k in range(world_size, 0, -1):
        j = cut[k][i]
        stages.append(modules[j:i])
        i = j
    return stages[::-1]
