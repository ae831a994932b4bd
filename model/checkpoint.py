"""safetensors checkpoints of MiniMax-M1: load either naming scheme, single file or sharded; save.

Naming schemes (everything else is named alike in both):

    original release                                         transformers (= our parameter names)
    model.layers.{i}.block_sparse_moe.gate.weight            model.layers.{i}.mlp.gate.weight
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  model.layers.{i}.mlp.experts.gate_up_proj[e, :F]
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  model.layers.{i}.mlp.experts.gate_up_proj[e, F:]
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  model.layers.{i}.mlp.experts.down_proj[e]

Loading is streaming: the model is built with its parameters on the meta device (no memory, no random
init), every key and shape of the checkpoint is checked against it from the file headers alone (one
error lists all missing keys, unexpected keys and shape mismatches), then parameters are allocated on
the target device and each checkpoint tensor is read and copied into its place one at a time — the
checkpoint is never held in memory twice. Saving writes the original names (or `transformers`' names)
in shards of at most `max_shard_bytes`, with a `model.safetensors.index.json` when there is more than one.
`transformers` checkpoints also hold the decay buffers of the lightning layers (HF_DERIVED_BUFFERS): they
are read past, as the model derives them from the config.

The same naming knowledge for state dicts in memory: `convert_per_expert_state_dict` (original per-expert
names to the stacked layout) and `without_derived_buffers` (a `transformers` state dict for our modules).
"""

import contextlib
import json
import os
import re
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import M1Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")

# One original per-expert weight: `{prefix}experts.{e}.w1|w2|w3.weight` (prefix `model.layers.{i}.block_sparse_moe.`
# in a checkpoint, anything in a block's own state dict).
_PER_EXPERT = re.compile(r"^(?P<prefix>.*)experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_ORIGINAL_BLOCK = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.")
# Buffers `transformers` saves in every lightning layer although the config determines them (decay rates
# and tables): read past, never loaded (our layers recompute their rates from the release's formula).
HF_DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_DERIVED = re.compile(rf"^model\.layers\.\d+\.self_attn\.({'|'.join(HF_DERIVED_BUFFERS)})$")
# Tensor dtypes a checkpoint may store (safetensors header names); anything else is not a weight of this model.
_FLOAT_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The parameter dtypes the model runs in.
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def stacked_target(prefix: str, e: int, w: str, ffn: int):
    """Where the original per-expert weight `{prefix}experts.{e}.{w}.weight` lives in the stacked layout:
    (parameter name, index). w1 (gate) is rows [0, F) of gate_up_proj[e], w3 (up) rows [F, 2F), w2 is
    down_proj[e]."""
    if w == "w2":
        return f"{prefix}experts.down_proj", (e,)
    return f"{prefix}experts.gate_up_proj", (e, slice(0, ffn) if w == "w1" else slice(ffn, 2 * ffn))


def convert_per_expert_state_dict(state_dict) -> dict:
    """Rename the original release's per-expert weights to the stacked layout of `moe_ops.SparseMoE`.

    `...experts.{e}.w1.weight` [F, H] (gate), `w3` [F, H] (up) and `w2` [H, F] (down) become
    `...experts.gate_up_proj` [E, 2F, H] and `...experts.down_proj` [E, H, F]; every other entry (for
    example `...gate.weight`) passes through unchanged. Works on a block's own state dict or a whole
    model's (any prefix such as `block_sparse_moe.`; the prefix is kept).
    """
    out, groups = {}, {}
    for name, tensor in state_dict.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = tensor
        else:
            groups.setdefault(m["prefix"], {})[(int(m["e"]), m["w"])] = tensor
    for prefix, weights in groups.items():
        E = 1 + max(e for e, _ in weights)
        missing = [f"{prefix}experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")
                   if (e, w) not in weights]
        if missing:
            raise ValueError(f"per-expert state dict is missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        first = weights[(0, "w1")]
        ffn, hidden = first.shape
        stacked = {f"{prefix}experts.gate_up_proj": first.new_empty(E, 2 * ffn, hidden),
                   f"{prefix}experts.down_proj": first.new_empty(E, hidden, ffn)}
        for (e, w), tensor in sorted(weights.items()):
            name, index = stacked_target(prefix, e, w, ffn)
            if tuple(stacked[name][index].shape) != tuple(tensor.shape):
                raise ValueError(f"{prefix}experts.{e}.{w}.weight has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(stacked[name][index].shape)} (from experts.0.w1: F={ffn}, H={hidden})")
            stacked[name][index] = tensor
        out.update(stacked)
    return out


def without_derived_buffers(state_dict) -> dict:
    """A `transformers` state dict without the decay buffers of its lightning layers (HF_DERIVED_BUFFERS),
    ready for `load_state_dict` of our modules, which derive them from the config."""
    return {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in HF_DERIVED_BUFFERS}


def parse_dtype(dtype, name: str = "dtype"):
    """A model dtype from a torch.dtype or its name as `transformers` takes it ("bfloat16", "float", ...;
    "auto" is resolved by the caller). Raises naming `name` for anything else."""
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"{name} {dtype!r} is not a torch dtype name; the model runs in "
                             f"{[str(d).removeprefix('torch.') for d in MODEL_DTYPES]}")
        dtype = value
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or its name, got {type(dtype).__name__}")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{name} {dtype} is not a dtype the model runs in ({', '.join(map(str, MODEL_DTYPES))})")
    return dtype


def checkpoint_files(folder) -> list[str]:
    """The safetensors files of a checkpoint folder (from its index when sharded)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
        absent = [p for p in files if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"{INDEX_FILE} names shards that are not there: {absent}")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def target_of(key: str, ffn: int):
    """Where checkpoint tensor `key` goes: (parameter name, index into it, part id) or None for a
    derived buffer. The part id tells which piece of a stacked expert parameter the key covers."""
    if _DERIVED.match(key):
        return None
    name = _ORIGINAL_BLOCK.sub(r"\1.mlp.", key)
    m = _PER_EXPERT.match(name) if name != key else None     # per-expert names only in the original naming
    if m:
        e, w = int(m["e"]), m["w"]
        return (*stacked_target(m["prefix"], e, w, ffn), (e, w))
    return name, (), "all"


def _required_parts(name: str, param, num_experts: int):
    """Parts that together fill a parameter: the whole, or every expert's pieces."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        return {"all"}, {(e, w) for e in range(num_experts) for w in ("w1", "w3")}
    if name.endswith(".mlp.experts.down_proj"):
        return {"all"}, {(e, "w2") for e in range(num_experts)}
    return {"all"}, None


def _unique_parameters(model):
    """name -> parameter, tied parameters once (under their first name)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def check_keys(model, shapes: dict, ffn: int, num_experts: int):
    """Raise one ValueError naming every missing key, unexpected key and shape mismatch.

    shapes: checkpoint key -> shape (from the file headers)."""
    params = _unique_parameters(model)
    covered = {name: set() for name in params}
    unexpected, mismatched = [], []
    for key, shape in shapes.items():
        target = target_of(key, ffn)
        if target is None:
            continue
        name, index, part = target
        if name not in params:
            unexpected.append(key)
            continue
        expected = tuple(params[name][index].shape)
        if tuple(shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(shape)} vs model {expected}")
            continue
        covered[name].add(part)
    missing = []
    for name, parts in covered.items():
        whole, pieces = _required_parts(name, params[name], num_experts)
        if parts & whole:
            continue
        if pieces is None or not parts:
            missing.append(name)
        elif pieces - parts:
            missing += [f"{name}[expert {e} {w}]" for e, w in sorted(pieces - parts)]
    if missing or unexpected or mismatched:
        lines = ["checkpoint does not match the model:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {label}: {shown}")
        raise ValueError("\n".join(lines))


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with parameters on the meta device (no memory, no init) and buffers as usual."""
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_",
                                                      "zeros_", "ones_", "xavier_uniform_", "xavier_normal_")}

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    for name in inits:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


def _materialize(model, dtype, device):
    """Allocate the meta parameters on `device` (uninitialised: the loader fills them); move buffers."""
    done = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                           requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)


def load_pretrained(cls, folder, dtype=None, device=None, backend=None):
    """Build `cls(config)` from a checkpoint folder; see the module docstring.

    dtype: a torch dtype or its name as `transformers` takes it ("bfloat16", "float32", ...); None or
    "auto": the config's `torch_dtype` (or `dtype`), else that of the checkpoint's first tensor."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a local checkpoint folder (for a model on the Hugging Face "
                                "Hub, download it first, e.g. with huggingface_hub.snapshot_download)")
    config = M1Config.from_pretrained(folder)
    if dtype is not None and dtype != "auto":
        dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    files = checkpoint_files(folder)
    with parameters_on_meta():
        model = cls(config, backend=backend)
    shapes, dtypes, where = {}, {}, {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in shapes:
                    raise ValueError(f"key {key} appears in two shards ({where[key]} and {path})")
                header = f.get_slice(key)
                shapes[key], dtypes[key], where[key] = header.get_shape(), header.get_dtype(), path
    check_keys(model, shapes, config.intermediate_size, config.num_local_experts)
    not_float = [f"{k} ({t})" for k, t in dtypes.items() if t not in _FLOAT_HEADER_DTYPES and not _DERIVED.match(k)]
    if not_float:
        raise TypeError(f"checkpoint tensors must be floating point (F32, BF16, F16, F64), got {', '.join(not_float)}")
    if dtype is None or dtype == "auto":
        with open(os.path.join(folder, "config.json")) as f:
            stored = json.load(f)
        name = stored.get("torch_dtype") or stored.get("dtype")
        dtype = parse_dtype(name, "config.json torch_dtype") if name is not None else \
            _FLOAT_HEADER_DTYPES[next(t for k, t in dtypes.items() if not _DERIVED.match(k))]
    _materialize(model, dtype, device)
    params = _unique_parameters(model)
    with torch.no_grad():
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    target = target_of(key, config.intermediate_size)
                    if target is not None:
                        name, index, _ = target
                        params[name][index].copy_(f.get_tensor(key))
    return model.eval()


def original_names(name: str, tensor, ffn: int):
    """(key, tensor) pairs of one parameter in the original release's names."""
    m = re.match(r"^(model\.layers\.\d+)\.mlp\.(.+)$", name)
    if not m:
        return [(name, tensor)]
    layer, rest = m.groups()
    prefix = f"{layer}.block_sparse_moe."
    parts = {"experts.gate_up_proj": ("w1", "w3"), "experts.down_proj": ("w2",)}.get(rest)
    if parts is None:
        return [(prefix + rest, tensor)]
    return [(f"{prefix}experts.{e}.{w}.weight", tensor[stacked_target("", e, w, ffn)[1]])
            for e in range(tensor.shape[0]) for w in parts]


def save_pretrained(model, folder, max_shard_bytes: int = 5 << 30, names: str = "original"):
    """Write config.json and the parameters as safetensors (see the module docstring).

    names="transformers" writes what `transformers`' MiniMaxForCausalLM.from_pretrained loads (it reports
    the decay buffers as missing and recomputes them: harmless)."""
    if names not in ("original", "transformers"):
        raise ValueError(f"names must be 'original' or 'transformers', got {names!r}")
    config = model.config
    if names == "transformers" and config.rotary_dim != config.head_dim:
        warnings.warn(f"rotary_dim {config.rotary_dim} < head_dim {config.head_dim}: transformers' MiniMax ignores "
                      "partial_rotary_factor and rotates every head dim, so it loads this checkpoint as a different "
                      "model (ours and the original release read it correctly)", stacklevel=3)
    os.makedirs(folder, exist_ok=True)
    # Weights of an earlier save into this folder go first: a stale index or shard would be loaded instead.
    for name in os.listdir(folder):
        if _WEIGHT_FILE.match(name):
            os.remove(os.path.join(folder, name))
    params = _unique_parameters(model)
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    entries = []                        # (key, tensor view) in a stable order
    for name, p in params.items():
        entries += original_names(name, p.detach(), config.intermediate_size) if names == "original" \
            else [(name, p.detach())]
    shards, current, size = [], [], 0
    for key, t in entries:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, t))
        size += nbytes
    shards.append(current)
    dtype = next(iter(params.values())).dtype
    stored = config.to_dict(names)
    stored["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(stored, f, indent=2)
    weight_map = {}
    for n, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        # One shard in host memory at a time; clones because views of one stacked tensor share storage.
        save_file({key: t.to("cpu", copy=True).contiguous() for key, t in shard},
                  os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({key: file for key, _ in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for _, t in entries)
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
