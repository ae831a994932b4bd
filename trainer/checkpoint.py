"""Trainer checkpoints through torch.distributed.checkpoint: model and optimizer state (sharded when the model
is parallelized: each rank writes its shards), and the loop's own state (step, learning-rate schedule, the
prompt sampler's RNG, torch's RNG states) as one pickled entry, so a resumed run continues the same curve.

    save_checkpoint(folder, trainer)     # folder/ holds DCP's files (.metadata, __0_0.distcp, ...)
    load_checkpoint(folder, trainer)
"""

import contextlib
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns that it assumes a single process when torch.distributed is not initialised: for a
    single-process run that is the intent, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def has_checkpoint(folder) -> bool:
    return os.path.isfile(os.path.join(os.fspath(folder), ".metadata"))


def _loop_state(trainer) -> dict:
    state = {"step": trainer.step, "scheduler": trainer.scheduler.state_dict(),
             "prompt_rng": trainer.prompt_rng.getstate(), "torch_rng": torch.get_rng_state(),
             "config": trainer.config.to_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(folder, trainer):
    """Write the trainer's state to `folder` (created; an older checkpoint there is overwritten)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    with _single_process_quietly():
        dcp.save({"model": model_state, "optim": optim_state, "loop": pickle.dumps(_loop_state(trainer))},
                 checkpoint_id=folder)


def load_checkpoint(folder, trainer):
    """Restore a state written by save_checkpoint into `trainer` (built from the same config) and push the
    weights into its engine."""
    folder = os.fspath(folder)
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no checkpoint in {folder} (no .metadata file)")
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_state, "optim": optim_state, "loop": b""}
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    loop = pickle.loads(state["loop"])
    saved, current = loop["config"], trainer.config.to_dict()
    changed = sorted(k for k in saved if k not in ("steps", "progress", "resume") and saved[k] != current.get(k))
    if changed:
        raise ValueError(f"checkpoint in {folder} was written with other settings for {changed}")
    trainer.step = loop["step"]
    trainer.scheduler.load_state_dict(loop["scheduler"])
    trainer.prompt_rng.setstate(loop["prompt_rng"])
    torch.set_rng_state(loop["torch_rng"])
    if "cuda_rng" in loop and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(loop["cuda_rng"])
    trainer.engine.update_weights(trainer.model)
