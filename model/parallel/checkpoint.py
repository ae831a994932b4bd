"""Checkpoints of the parallel model.

- `save_sharded` / `load_sharded`: torch.distributed.checkpoint (DCP). Each rank writes its own
  shards with their global offsets; loading reads whatever slices the loading ranks own, so a
  checkpoint saved on one mesh loads on another (other world size, other dims). The optimizer state
  travels with the model.
- `from_pretrained_parallel`: a safetensors checkpoint (model/checkpoint.py: either naming, single
  file or sharded) loaded straight into a parallelized model. Every rank builds the model on the meta
  device, parallelizes it (still on meta), allocates only its own shards and reads from the files
  only the slices those shards cover; no rank ever holds the whole model.
"""

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from m1_kernels.model.checkpoint import (check_keys, checkpoint_files, parameters_on_meta, parse_dtype,
                                         target_of)
from m1_kernels.model.config import M1Config
from m1_kernels.model.modeling import M1ForCausalLM

from .api import parallelize


def _state(model, optimizer):
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(path, model, optimizer=None):
    """Write the parallel model's parameters (and the optimizer's state) with DCP into folder `path`;
    every rank of the model's mesh must call it."""
    dcp.save(_state(model, optimizer), checkpoint_id=os.fspath(path))


def load_sharded(path, model, optimizer=None):
    """Read a `save_sharded` checkpoint into a parallel model (and its optimizer) on any mesh; every rank
    must call it. The model must have the checkpoint's architecture (shapes are checked by DCP)."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _box(index, shape):
    """The region of a parameter of `shape` that a checkpoint tensor fills: per dim (start, stop,
    dropped), dropped for the dims an integer index removes (one expert of a stacked weight)."""
    box = []
    for d, size in enumerate(shape):
        i = index[d] if d < len(index) else slice(None)
        if isinstance(i, int):
            box.append((i, i + 1, True))
        else:
            start, stop, _ = i.indices(size)
            box.append((start, stop, False))
    return box


def _read_into(local, offset, box, tensor_slice):
    """Copy the part of a checkpoint tensor (`tensor_slice`: a safetensors slice) that falls inside this
    rank's shard (`local`, at global `offset`) into it; reads only that part from the file."""
    src, dst = [], []
    for (start, stop, dropped), o, n in zip(box, offset, local.shape):
        lo, hi = max(start, o), min(stop, o + n)
        if lo >= hi:
            return
        dst.append(slice(lo - o, hi - o))
        if not dropped:
            src.append(slice(lo - start, hi - start))
    piece = tensor_slice[tuple(src)] if src else tensor_slice[:]
    local[tuple(dst)].copy_(piece.reshape([s.stop - s.start for s in dst]))


def from_pretrained_parallel(folder, mesh, *, dtype=None, backend=None, **parallel_options) -> M1ForCausalLM:
    """A parallelized M1ForCausalLM loaded from a safetensors checkpoint folder, each rank reading only
    the slices of its own shards.

    Args:
        folder: a local checkpoint folder (config.json and model.safetensors or an index and shards,
            in the original release's names or `transformers`' names).
        mesh: the DeviceMesh for `parallelize`.
        dtype: parameter dtype (a torch dtype or its name; None or "auto": the config's torch_dtype,
            else the first tensor's).
        backend: kernel backend of the model's ops, one or one per op family (as in M1ForCausalLM).
        parallel_options: passed to `parallelize` (param_dtype, reduce_dtype, io, ...).
    """
    folder = os.fspath(folder)
    config = M1Config.from_pretrained(folder)
    files = checkpoint_files(folder)
    with parameters_on_meta():
        model = M1ForCausalLM(config, backend=backend)
    shapes, first_dtype = {}, None
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                header = f.get_slice(key)
                shapes[key] = header.get_shape()
                if first_dtype is None and target_of(key, config.intermediate_size) is not None:
                    first_dtype = header.get_dtype()
    check_keys(model, shapes, config.intermediate_size, config.num_local_experts)
    if dtype is None or dtype == "auto":
        with open(os.path.join(folder, "config.json")) as f:
            stored = json.load(f)
        dtype = stored.get("torch_dtype") or stored.get("dtype") or \
            {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}[first_dtype]
    model.cast_parameters(parse_dtype(dtype))
    parallelize(model, mesh, **parallel_options)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)
    buffers = {name: b.clone() for name, b in model.named_buffers()}     # derived from the config, not stored
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    target = target_of(key, config.intermediate_size)
                    if target is None:
                        continue
                    name, index, _ = target
                    param = params[name]
                    local, offset = param, (0,) * param.ndim
                    if isinstance(param, DTensor):
                        local = param.to_local()
                        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                          param.placements)
                    _read_into(local, offset, _box(index, param.shape), f.get_slice(key))
    return model
