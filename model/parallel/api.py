"""`parallelize(model, mesh)`: FSDP2, expert parallelism and context parallelism, applied from outside.

The model code is unchanged; parallelize swaps the classes of some modules in place (parameters and
their names stay, so checkpoints and optimizers see the same names) and adds hooks:

- "ep": every SparseMoE becomes an ExpertParallelMoE (expert.py) holding E / ep experts.
- "cp": lightning layers become ContextParallelLightning, softmax layers ContextParallelSoftmax
  (context.py).
- FSDP2 `fully_shard` on the embedding, on every decoder layer, then on the root (which keeps the
  final norm and the LM head).
  The dense parameters are sharded over all the mesh's ranks (dp x ep x cp flattened); the expert
  weights, already split over "ep", are sharded over the other dims (dp x cp) in a group of their
  own (not at all when "ep" is the only dim).

Batch layout and gradients. Ranks of different "dp" coordinates take different batches (data
parallel: gradients are averaged over dp). The ranks of one ep x cp group share one batch and split
its work: the rows over "ep", the tokens of each row in contiguous chunks over "cp" (both as evenly
as possible, the first ranks one longer; a rank may get none). Each rank's gradients are its block's
contributions, summed over ep x cp by the FSDP reduce-scatter (its divide factor is the dp size).

With io="full" (the default) every rank of an ep x cp group passes the whole batch and receives the
whole logits (all-gathered); the backward takes each rank's own block of the logits' gradient, which
is right because every rank computes the same loss from the same logits: a single-GPU script runs
unchanged. With io="local" each rank passes its own block (`shard_batch`) and receives its block's
logits; its loss must then be its block's share of the global loss (for a mean over tokens: the
sum over its tokens divided by the global token count), so that the sum over ep x cp is the loss.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from m1_kernels.lightning_ops import LightningAttention
from m1_kernels.model.modeling import M1ForCausalLM, SoftmaxAttention

from .comm import all_gather_sizes, gather_replicated, split_sizes
from .context import ContextParallelLightning, ContextParallelSoftmax
from .expert import ExpertParallelMoE

MESH_DIMS = ("dp", "ep", "cp")
IO_MODES = ("full", "local")
_FORWARD_ONLY_ARGS = ("cache", "slot_idx", "lengths", "last_token_only")


def _check_mesh(mesh):
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names
    if not names or len(set(names)) != len(names) or any(n not in MESH_DIMS for n in names):
        raise ValueError(f"mesh dims must be distinct names among {MESH_DIMS}, got {names}")
    return names


class BatchLayout:
    """Which block of a batch [B, T, ...] this rank computes: rows split over "ep", tokens over "cp"."""

    def __init__(self, mesh: DeviceMesh):
        names = _check_mesh(mesh)
        self.ep_group = mesh["ep"].get_group() if "ep" in names else None
        self.cp_group = mesh["cp"].get_group() if "cp" in names else None
        self.ep_rank, self.ep_size = (mesh["ep"].get_local_rank(), mesh["ep"].size()) if "ep" in names else (0, 1)
        self.cp_rank, self.cp_size = (mesh["cp"].get_local_rank(), mesh["cp"].size()) if "cp" in names else (0, 1)

    def row_sizes(self, B):
        return split_sizes(B, self.ep_size)

    def token_sizes(self, T):
        return split_sizes(T, self.cp_size)

    def shard(self, tensor):
        """This rank's block of `tensor` [B, T, ...] (rows of its ep rank, tokens of its cp rank)."""
        if tensor.ndim < 2:
            raise ValueError(f"shard_batch needs a [B, T, ...] tensor, got shape {tuple(tensor.shape)}")
        rows, tokens = self.row_sizes(tensor.shape[0]), self.token_sizes(tensor.shape[1])
        r0, t0 = sum(rows[:self.ep_rank]), sum(tokens[:self.cp_rank])
        return tensor[r0:r0 + rows[self.ep_rank], t0:t0 + tokens[self.cp_rank]]


def shard_batch(tensor, mesh: DeviceMesh):
    """This rank's block of a batch tensor [B, T, ...] under parallelize(..., io="local"): the rows of
    its "ep" coordinate and the tokens of its "cp" coordinate. Use it on the input ids and on
    everything the loss needs per token (targets, masks, advantages)."""
    return BatchLayout(mesh).shard(tensor)


class _InputHook:
    """Forward pre-hook of M1Model: this rank's block of the input ids and their global positions."""

    def __init__(self, layout: BatchLayout, io: str):
        self.layout, self.io = layout, io

    def __call__(self, module, args, kwargs):
        if any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values()):
            raise ValueError("the parallel model's M1Model runs full forwards only (no cache, batch or positions)")
        input_ids = args[0]
        if self.io == "full":
            input_ids = self.layout.shard(input_ids)
            start = sum(self.layout.token_sizes(args[0].shape[1])[:self.layout.cp_rank])
        elif self.layout.cp_group is not None:
            sizes = all_gather_sizes(input_ids.shape[1], self.layout.cp_group, input_ids.device)
            start = sum(sizes[:self.layout.cp_rank])
        else:
            start = 0
        B, T = input_ids.shape
        positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        return (input_ids,), {"positions": positions}


class _OutputHook:
    """Forward hook of the root (io="full"): every rank's logits block gathered into the full logits."""

    def __init__(self, layout: BatchLayout):
        self.layout = layout

    def __call__(self, module, args, kwargs, logits):
        input_ids = args[0] if args else kwargs["input_ids"]
        B, T = input_ids.shape
        if self.layout.cp_group is not None:
            logits = gather_replicated(logits, 1, self.layout.token_sizes(T), self.layout.cp_group)
        if self.layout.ep_group is not None:
            logits = gather_replicated(logits, 0, self.layout.row_sizes(B), self.layout.ep_group)
        return logits


def _reject_inference_args(module, args, kwargs):
    given = dict(zip(_FORWARD_ONLY_ARGS, args[1:]))
    given.update((k, kwargs[k]) for k in _FORWARD_ONLY_ARGS if k in kwargs)
    used = [name for name, value in given.items() if value is not None and value is not False]
    if used:
        raise ValueError(f"the parallel model runs full forwards (training, scoring): {', '.join(used)} not "
                         "supported; generate with an unparallelized model")


def _flat(mesh, dims):
    """The 1-D mesh over `dims` of `mesh` (flattened when there are several)."""
    if len(dims) == 1:
        return mesh[dims[0]]
    sub = mesh if tuple(dims) == tuple(mesh.mesh_dim_names) else mesh[tuple(dims)]
    return sub._flatten("_".join(dims))


def _apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward):
    names = mesh.mesh_dim_names
    dense_mesh = _flat(mesh, names)
    others = [n for n in names if n != "ep"]
    expert_mesh = _flat(mesh, others) if "ep" in names and others else None
    # cast_forward_inputs=False: the layers' fp32 RoPE tables stay fp32 (the hidden states arrive in
    # param_dtype from the embedding anyway).
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # The final norm and LM head compute in their stored dtype (fp32 for fp32 master weights).
    head = MixedPrecisionPolicy(reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    ignored = set()
    for layer in model.model.layers:
        if isinstance(layer.mlp, ExpertParallelMoE):
            if expert_mesh is None:   # nothing to shard them over: each rank owns its experts outright
                ignored |= set(layer.mlp.experts.parameters())
            else:
                fully_shard(layer.mlp.experts, mesh=expert_mesh, mp_policy=compute,
                            reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=dense_mesh, mp_policy=compute, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored or None)
    # The root group holds what the root's own forward touches outside any submodule call (the LM head
    # weight, read directly by an fp32 head): the final norm and LM head, in their own precision. A tied
    # head shares the embedding's weight, so then the embedding stays in the root group too.
    if model.config.tie_word_embeddings:
        fully_shard(model, mesh=dense_mesh, mp_policy=compute, ignored_params=ignored or None)
    else:
        fully_shard(model.model.embed_tokens, mesh=dense_mesh, mp_policy=compute,
                    reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dense_mesh, mp_policy=head, ignored_params=ignored or None)
    dp = mesh["dp"].size() if "dp" in names else 1
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(dp))    # mean over dp, sum over ep x cp
            if mesh.device_type != "cuda":   # gloo has no pre-multiplied sum: a sum, then a division
                module.set_force_sum_reduction_for_comms(True)


def parallelize(model: M1ForCausalLM, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, io: str = "full",
                reshard_after_forward: bool | None = None) -> M1ForCausalLM:
    """Data, expert and context parallelism for an M1ForCausalLM, in place (see the module docstring).

    Args:
        model: the model, on the mesh's device type or on the meta device (then materialise it with
            `model.to_empty(device=...)` and load weights, e.g. `from_pretrained_parallel`). Every
            rank must pass the same model (same seed or the same checkpoint).
        mesh: a DeviceMesh whose dims are named among "dp", "ep", "cp" (any subset, any sizes; "ep"
            must divide the number of experts).
        param_dtype: compute dtype of the parameters (None: the stored dtype, so an fp32 model
            computes exactly as the plain model). torch.bfloat16 gives bf16 compute on fp32 master
            weights; the final norm and LM head then still compute in fp32.
        reduce_dtype: dtype of the gradient reduce-scatter (default fp32).
        io: "full" (every rank of an ep x cp group passes the whole batch and gets the whole logits) or
            "local" (each rank passes `shard_batch(input_ids, mesh)` and gets its block's logits).
        reshard_after_forward: FSDP2's option for the layers (None: its default, True).

    Returns:
        The same model object. Its forward takes input_ids only (no cache: generate with a plain model).
    """
    if not isinstance(model, M1ForCausalLM):
        raise TypeError(f"model must be an M1ForCausalLM, got {type(model).__name__}")
    layout = BatchLayout(mesh)
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    if param_dtype is not None and model.config.tie_word_embeddings:
        raise ValueError("param_dtype with tie_word_embeddings: the tied LM head could not stay in fp32")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is already parallelized (it holds FSDP modules)")
    ep = layout.ep_size
    if model.config.num_local_experts % ep:
        raise ValueError(f"the ep mesh size {ep} must divide num_local_experts {model.config.num_local_experts}")
    if mesh.device_type == "cuda" and not dist.is_nccl_available():
        raise RuntimeError("a CUDA mesh needs NCCL")

    for layer in model.model.layers:
        if layout.ep_group is not None:
            ExpertParallelMoE.convert(layer.mlp, mesh["ep"])
        if layout.cp_group is not None:
            if isinstance(layer.self_attn, LightningAttention):
                ContextParallelLightning.convert(layer.self_attn, layout.cp_group)
            elif isinstance(layer.self_attn, SoftmaxAttention):
                ContextParallelSoftmax.convert(layer.self_attn, layout.cp_group)
    _apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    model.register_forward_pre_hook(_reject_inference_args, with_kwargs=True, prepend=True)  # before FSDP's
    model.model.register_forward_pre_hook(_InputHook(layout, io), with_kwargs=True)
    if io == "full" and (layout.ep_group is not None or layout.cp_group is not None):
        model.register_forward_hook(_OutputHook(layout), with_kwargs=True)
    return model
