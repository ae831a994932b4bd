"""Parallel MiniMax-M1 on torch.distributed (docs/parallel.md): FSDP2 ("dp"), expert parallelism
("ep"), context parallelism ("cp", LASP-2 for the lightning layers) and sharded checkpoints.

    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "ep"))
    model = parallelize(M1ForCausalLM(config), mesh)
"""

from .api import parallelize, shard_batch
from .checkpoint import from_pretrained_parallel, load_sharded, save_sharded
from .comm import split_sizes
from .context import lightning_attn_cp

__all__ = ["from_pretrained_parallel", "lightning_attn_cp", "load_sharded", "parallelize",
           "save_sharded", "shard_batch", "split_sizes"]
