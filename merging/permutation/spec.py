"""Permutation specs: which axes of which parameters share one permutation group.

Hidden units of a network can be reordered without changing its function, provided every
tensor that reads or writes those units is reordered the same way (Git Re-Basin's
"permutation spec", Ainsworth, Hayase and Srinivasa, ICLR 2023, section 3 and appendix A).
A `PermutationSpec` records, for every parameter (and buffer) of a state dict, one entry per
axis: the name of the group that permutes that axis, or None. A group of size n permutes
an axis of length n*b in blocks of b (b = 1 for ordinary units; b = head_dim for attention
heads, b = H*W where a conv's channels were flattened into a linear layer's inputs).

Convention (used by every module of this package): a permutation is an index tensor `p` of
length n, and applying it to an axis gives `W'[k] = W[p[k]]` (block-wise), i.e. `W' = P W`
with `P[k, p[k]] = 1`. The composition "first p, then q" is `p[q]`; the inverse is
`argsort(p)`.

Specs come from
- `spec_from_module(module, example)`: derived from the module graph with torch.fx by
  propagating "unit spaces" through the graph (linear/conv outputs open a new space,
  elementwise ops, norms, pools and flatten keep it, additions and elementwise products
  join spaces, the graph's inputs and outputs and every op not known to be equivariant fix
  them). Covers MLPs, VGG-style CNNs and CIFAR-style ResNets (residual additions make a
  block group share one permutation; BatchNorm follows its conv).
- `llama_spec(config)`: Llama-style decoders (written by hand, since HF Llama does not trace
  with plain torch.fx): the residual stream (embeddings, every RMSNorm, the inputs of q/k/v
  and gate/up, the outputs of o and down, lm_head), each MLP's hidden units, and each
  layer's attention heads as blocks (grouped by key/value head under GQA; RoPE acts inside
  a head, so whole heads may move).

`check_invariance` applies random permutations from a spec to a model and measures how much
its outputs move; the tests require float-tolerance agreement for every architecture.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

Perms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """`axes[param]` is one entry per axis (group name or None); `sizes[group]` the group size;
    `repair_layers` the modules (by name) whose output units REPAIR renormalizes."""

    axes: dict[str, tuple[str | None, ...]]
    sizes: dict[str, int]
    repair_layers: tuple[str, ...] = field(default=())

    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """group -> [(param, axis), ...] in parameter order."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for name, axes in self.axes.items():
            for ax, g in enumerate(axes):
                if g is not None:
                    out[g].append((name, ax))
        return out

    def block(self, name: str, axis: int, shape: tuple[int, ...]) -> int:
        return shape[axis] // self.sizes[self.axes[name][axis]]

    def validate(self, state: Mapping[str, torch.Tensor], where: str = "model") -> None:
        """Raises ValueError naming the parameter if the spec does not fit `state`."""
        if not self.axes or not self.sizes:
            raise ValueError("permutation spec: it permutes nothing (no axes or no groups)")
        for g, n in self.sizes.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"permutation spec: group {g} has invalid size {n!r}")
        for name, axes in self.axes.items():
            if name not in state:
                raise ValueError(f"{where}: parameter {name} named by the permutation spec is missing")
            shape = tuple(state[name].shape)
            if len(axes) != len(shape):
                raise ValueError(f"{where}: {name} has {len(shape)} axes, the permutation spec gives {len(axes)}")
            named = [g for g in axes if g is not None]
            if len(set(named)) != len(named):
                raise ValueError(f"permutation spec: {name} has one group on two axes")
            for ax, g in enumerate(axes):
                if g is None:
                    continue
                if g not in self.sizes:
                    raise ValueError(f"permutation spec: {name} axis {ax} names unknown group {g}")
                if shape[ax] % self.sizes[g]:
                    raise ValueError(f"{where}: {name} axis {ax} has length {shape[ax]}, "
                                     f"not a multiple of group {g}'s size {self.sizes[g]}")
        for g, members in self.groups.items():
            if not members:
                raise ValueError(f"permutation spec: group {g} permutes no parameter")

    def to_json(self) -> dict:
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "sizes": dict(self.sizes),
                "repair_layers": list(self.repair_layers)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PermutationSpec":
        try:
            return cls({k: tuple(v) for k, v in data["axes"].items()}, {k: int(v) for k, v in data["sizes"].items()},
                       tuple(data.get("repair_layers", ())))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"permutation spec: malformed JSON ({e!r}); expected {{axes, sizes}}") from None

    @classmethod
    def load(cls, path: str | Path) -> "PermutationSpec":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"params.spec: cannot read permutation spec {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Permutations and their application
# ---------------------------------------------------------------------------------------------

def identity_perms(spec: PermutationSpec, device=None) -> Perms:
    return {g: torch.arange(n, device=device) for g, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


def inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The permutation "apply `first`, then `then`" (as index arrays: first[then])."""
    return first[then]


def _expand(p: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return p
    return (p[:, None] * block + torch.arange(block, device=p.device)).reshape(-1)


def permute_tensor(t: torch.Tensor, axes: tuple[str | None, ...], perms: Perms, sizes: Mapping[str, int],
                   skip: str | None = None) -> torch.Tensor:
    """`t` with every axis that has a group (other than `skip`) permuted by `perms`."""
    for ax, g in enumerate(axes):
        if g is None or g == skip or g not in perms:
            continue
        idx = _expand(perms[g].to(t.device), t.shape[ax] // sizes[g])
        t = t.index_select(ax, idx)
    return t


def permute_state(spec: PermutationSpec, state: Mapping[str, torch.Tensor], perms: Perms) -> dict[str, torch.Tensor]:
    """A new state dict: every parameter of the spec permuted (others shared, unchanged)."""
    return {n: permute_tensor(t, spec.axes[n], perms, spec.sizes) if n in spec.axes else t for n, t in state.items()}


# ---------------------------------------------------------------------------------------------
# Specs from the module graph (torch.fx)
# ---------------------------------------------------------------------------------------------

_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity,
                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_PASS_FUNCS = {torch.relu, torch.tanh, torch.sigmoid, torch.flatten, nn.functional.relu, nn.functional.gelu,
               nn.functional.silu, nn.functional.leaky_relu, nn.functional.dropout, nn.functional.max_pool2d,
               nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "flatten", "sigmoid", "tanh", "contiguous", "clone"}
_JOIN = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}
_SCALAR_OK = {operator.truediv, operator.mul, operator.imul, torch.mul}  # tensor (op) python scalar
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.units: list[int | None] = []

    def new(self, units: int | None) -> int:
        self.parent.append(len(self.parent))
        self.units.append(units)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == 0:  # keep the fixed space (0) as the root
            ra, rb = rb, ra
        self.parent[rb] = ra
        ua, ub = self.units[ra], self.units[rb]
        if ra != 0 and ua is not None and ub is not None and ua != ub:
            self.parent[ra] = 0  # spaces of different widths cannot share a permutation
        elif ua is None:
            self.units[ra] = ub
        return self.find(ra)


def spec_from_module(module: nn.Module, fixed: tuple[str, ...] = ()) -> PermutationSpec:
    """Derives the permutation spec of `module` from its torch.fx graph (see the module docstring).

    Conservative: an op that is not known to commute with permutations of its input's units
    fixes them (no permutation), so the derived spec may permute less than possible, never
    wrongly. `fixed` lists parameter names whose every axis must stay unpermuted.
    Group names are `P_<module>` after the linear/conv layer that first writes the units.
    """
    import torch.fx as fx

    gm = fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    uf = _UnionFind()
    FIXED = uf.new(None)
    space: dict[fx.Node, int | None] = {}
    entries: list[tuple[str, int, int]] = []  # (param, axis, space)
    producer_of: dict[int, list[str]] = {}    # space -> modules writing it
    bn_fed: set[str] = set()
    layer_out: dict[int, str] = {}

    def sp(a) -> int | None:
        return space.get(a) if isinstance(a, fx.Node) else None

    def fix_all(args) -> None:
        for a in _nodes(args):
            s = sp(a)
            if s is not None:
                uf.union(FIXED, s)

    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr":
            space[node] = FIXED
        elif node.op == "output":
            fix_all(node.args)
        elif node.op == "call_module":
            m = mods[node.target]
            x = sp(node.args[0]) if node.args else None
            if isinstance(m, _LAYERS) and getattr(m, "groups", 1) == 1 and x is not None:
                out = uf.new(m.weight.shape[0])
                entries.append((f"{node.target}.weight", 1, x))
                entries.append((f"{node.target}.weight", 0, out))
                if m.bias is not None:
                    entries.append((f"{node.target}.bias", 0, out))
                producer_of.setdefault(out, []).append(node.target)
                layer_out[out] = node.target
                space[node] = out
            elif isinstance(m, _NORMS) and x is not None and (
                    not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) == 1):
                for pname, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                    if pname != "num_batches_tracked":
                        entries.append((f"{node.target}.{pname}", 0, x))
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and isinstance(node.args[0], fx.Node) \
                        and node.args[0].op == "call_module":
                    bn_fed.add(node.args[0].target)
                space[node] = x
            elif isinstance(m, _PASS_MODULES) and x is not None:
                space[node] = x
            else:
                fix_all(node.args)
                space[node] = FIXED
        elif node.op in ("call_function", "call_method"):
            tensors = [a for a in _nodes(node.args) if sp(a) is not None]
            scalars_only = all(isinstance(a, (int, float)) for a in node.args if not isinstance(a, fx.Node))
            if node.op == "call_method" and node.target == "size":
                space[node] = None
            elif (node.target in _PASS_FUNCS or (node.op == "call_method" and node.target in _PASS_METHODS)) \
                    and tensors and _flatten_ok(node):
                space[node] = sp(node.args[0])
            elif node.target in _JOIN and len(tensors) == 2:
                space[node] = uf.union(sp(tensors[0]), sp(tensors[1]))
            elif node.target in _SCALAR_OK and len(tensors) == 1 and scalars_only and sp(node.args[0]) is not None:
                space[node] = sp(node.args[0])
            else:
                fix_all(node.args)
                space[node] = FIXED if tensors else None
        else:
            fix_all(node.args)

    state = dict(module.state_dict())
    for name in fixed:
        for p, ax, s in entries:
            if p == name:
                uf.union(FIXED, s)
    # Axes whose length is not a multiple of their space's width (e.g. a flatten that did not
    # keep channels contiguous) cannot be permuted block-wise: fix them, and repeat until stable.
    changed = True
    while changed:
        changed = False
        for p, ax, s in entries:
            r = uf.find(s)
            if r != 0 and (uf.units[r] is None or state[p].shape[ax] % uf.units[r]):
                uf.union(FIXED, s)
                changed = True

    names: dict[int, str] = {}
    for out, target in layer_out.items():  # name each group after its first writer
        r = uf.find(out)
        if r != 0 and r not in names:
            names[r] = "P_" + target
    axes: dict[str, list[str | None]] = {}
    for p, ax, s in entries:
        axes.setdefault(p, [None] * state[p].dim())
        r = uf.find(s)
        axes[p][ax] = names.get(r) if r != 0 else None
    sizes = {names[r]: uf.units[r] for r in names}
    axes_t = {p: tuple(a) for p, a in axes.items() if any(g is not None for g in a)}
    writers: dict[str, list[str]] = {}
    for out, mods_ in producer_of.items():
        r = uf.find(out)
        if r != 0:
            writers.setdefault(names[r], []).extend(mods_)
    repair = tuple(ms[0] for g, ms in writers.items() if len(ms) == 1 and ms[0] not in bn_fed)
    used = {g for a in axes_t.values() for g in a if g is not None}
    return PermutationSpec(axes_t, {g: n for g, n in sizes.items() if g in used}, repair)


def _nodes(args) -> list:
    import torch.fx as fx

    out: list = []

    def visit(a):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out


def _flatten_ok(node) -> bool:
    """flatten keeps units contiguous (channel-major) only from dim 1 on."""
    if node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return True


# ---------------------------------------------------------------------------------------------
# Llama-style decoders (by hand)
# ---------------------------------------------------------------------------------------------

def llama_spec(config: Mapping[str, Any] | Any, names: set[str] | None = None) -> PermutationSpec:
    """The spec of a HF `LlamaForCausalLM` (config as a dict or a `LlamaConfig`).

    Groups: `res` (hidden_size; the residual stream), `mlp<l>` (intermediate_size), and
    `heads<l>` (num_key_value_heads; q and o move num_attention_heads/num_key_value_heads
    heads per block, k and v one head). `names`, when given, are the state dict's names
    (to include `lm_head.weight` only when it is stored untied).
    """
    c = config if isinstance(config, Mapping) else config.to_dict()
    try:
        hidden, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json: not a Llama config (missing or bad {e})") from None
    if heads % kv:
        raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    axes: dict[str, tuple[str | None, ...]] = {"model.embed_tokens.weight": (None, "res"), "model.norm.weight": ("res",)}
    if names is None or "lm_head.weight" in names:
        if not c.get("tie_word_embeddings", False) or (names is not None and "lm_head.weight" in names):
            axes["lm_head.weight"] = (None, "res")
    sizes = {"res": hidden}
    repair = []
    bias_attn, bias_mlp = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    for i in range(layers):
        p, h, m = f"model.layers.{i}.", f"heads{i}", f"mlp{i}"
        sizes[h], sizes[m] = kv, inter
        axes[p + "input_layernorm.weight"] = ("res",)
        axes[p + "post_attention_layernorm.weight"] = ("res",)
        for proj in ("q_proj", "k_proj", "v_proj"):
            axes[p + f"self_attn.{proj}.weight"] = (h, "res")
            if bias_attn:
                axes[p + f"self_attn.{proj}.bias"] = (h,)
        axes[p + "self_attn.o_proj.weight"] = ("res", h)
        if bias_attn:
            axes[p + "self_attn.o_proj.bias"] = ("res",)
        for proj in ("gate_proj", "up_proj"):
            axes[p + f"mlp.{proj}.weight"] = (m, "res")
            if bias_mlp:
                axes[p + f"mlp.{proj}.bias"] = (m,)
            repair.append(p + f"mlp.{proj}")
        axes[p + "mlp.down_proj.weight"] = ("res", m)
        if bias_mlp:
            axes[p + "mlp.down_proj.bias"] = ("res",)
    if names is not None:
        axes = {k: v for k, v in axes.items() if k in names}
    return PermutationSpec(axes, sizes, tuple(repair))


# ---------------------------------------------------------------------------------------------
# Checking a spec
# ---------------------------------------------------------------------------------------------

def check_invariance(model: nn.Module, spec: PermutationSpec, inputs: Any, seed: int = 0,
                     forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> float:
    """Max |f(x) - f_perm(x)| / max |f(x)| over `inputs` for random permutations from `spec`.

    `forward(model, inputs)` returns the output tensor (default: `model(inputs)`, taking
    `.logits` when present). The model is evaluated in eval mode; it is not modified.
    """
    import copy

    run = forward or (lambda m, x: _out(m(x)))
    state = model.state_dict()
    spec.validate(state)
    perms = random_perms(spec, torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(spec, state, perms))
    model.eval(), other.eval()
    with torch.no_grad():
        a, b = run(model, inputs), run(other, inputs)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _out(y):
    return y.logits if hasattr(y, "logits") else y
