"""The trainer's configuration: one dataclass, checked field by field, read from JSON or TOML.

    config = TrainerConfig.from_file("run.toml")     # or TrainerConfig(method="ppo", eps_low=0.2, ...)

A bad value or an unknown key raises ValueError (TypeError for a wrong type) naming the field. The defaults are
the M1 report's where it gives them (AdamW betas (0.9, 0.95), eps 1e-15, CISPO with no lower bound) and a small
toy run otherwise.
"""

import dataclasses
import json
import os
import tomllib
from typing import Any

from m1_kernels.model.modeling import family_backends

from . import head_loss
from .loss import ADVANTAGE_STD, METHODS, NORMALIZATIONS
from .tasks import TASKS

DTYPES = ("float32", "bfloat16")
OLD_LOGPROBS = ("engine", "recompute")
LOGPROBS_FROM = ("fused", "logits")
LOGITS_GEMMS = (None, *head_loss.LOGITS_GEMMS)   # None: head_loss's default
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass
class TrainerConfig:
    """Fields, by group (docs/trainer.md has the long version):

    Model: model_preset (an M1Config preset), model_overrides (M1Config fields), init_checkpoint (a folder from
    save_pretrained; its config wins over preset and overrides), dtype ("float32" or "bfloat16" parameters),
    backend (kernel backend of the model's ops, None = default; a table such as {moe = "cuda"} sets it per op
    family, see M1ForCausalLM), device (None = cuda if available).
    Task: task (a name in trainer.tasks.TASKS), task_options.
    Rollouts: prompts_per_step (P), samples_per_prompt (G), max_new_tokens, temperature, top_p, top_k,
    repetition_stop ([n, p] or None: the engine ends a completion after n tokens each above probability p),
    dynamic_sampling (drop groups whose rewards are all equal, and sample more prompts, up to
    max_sampling_rounds rounds, to fill P groups), overlong_buffer / overlong_penalty (DAPO's length penalty:
    from max_new_tokens - overlong_buffer tokens on, the reward falls linearly to -overlong_penalty; 0 = off).
    Loss: method, eps_low, eps_high, normalization, advantage_std (see trainer.loss).
    Updates: updates_per_batch (mu: the generation batch is split into mu mini-batches, one optimizer step
    each, so later ones are off-policy), micro_batch_size (sequences per forward/backward), old_logprobs
    ("engine": the rollout's own; "recompute": the training forward, no backward, before the updates),
    batch_invariant (every sequence's forward runs alone, so its log-probs do not depend on the batch it is
    in; needs old_logprobs="recompute", which then equal the training forward's bit for bit), logprobs_from
    ("fused": final hidden states through fused_logprobs; "logits": the model's full logits, for models whose
    root forward must run, e.g. parallelized ones), logits_gemm (the updates' one-pass head loss, see
    trainer.fused_head_loss: "cublas" for bf16 parameters, faster; "triton", as accurate as an fp32 head; None,
    its default), activation_checkpointing (per decoder layer).
    Optimizer: lr, betas, adam_eps, weight_decay, grad_clip (max gradient norm; 0 = off), lr_schedule
    ("constant", "linear" or "cosine" decay to min_lr_ratio * lr after warmup_steps linear warm-up steps;
    counted in optimizer steps).
    Run: steps (generation batches), seed, out_dir (metrics.jsonl, plots, checkpoints), checkpoint_every
    (steps; 0 = only at the end), resume (continue from out_dir's checkpoint when there is one),
    max_num_seqs / max_model_len (the engine's), progress (a progress bar).
    """
    model_preset: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    init_checkpoint: str | None = None
    dtype: str = "float32"
    backend: str | dict | None = None
    device: str | None = None
    task: str = "reverse"
    task_options: dict = dataclasses.field(default_factory=dict)
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_stop: list | None = None
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 4
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    method: str = "cispo"
    eps_low: float | None = None
    eps_high: float | None = 0.28
    normalization: str | None = None
    advantage_std: str | None = "sample"
    updates_per_batch: int = 4
    micro_batch_size: int = 64
    old_logprobs: str = "engine"
    batch_invariant: bool = False
    logprobs_from: str = "fused"
    logits_gemm: str | None = None
    activation_checkpointing: bool = False
    lr: float = 1e-4
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/trainer"
    checkpoint_every: int = 0
    resume: bool = True
    max_num_seqs: int = 256
    max_model_len: int = 256
    progress: bool = True

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self):
        """Raise naming the first bad field."""
        for name in ("model_preset", "task", "out_dir"):
            _string(name, getattr(self, name))
        for name in ("init_checkpoint", "device"):
            if getattr(self, name) is not None:
                _string(name, getattr(self, name))
        family_backends(self.backend)
        for name in ("model_overrides", "task_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a table/dict, got {type(getattr(self, name)).__name__}")
        for name, choices in (("dtype", DTYPES), ("task", tuple(TASKS)), ("method", METHODS),
                              ("old_logprobs", OLD_LOGPROBS), ("logprobs_from", LOGPROBS_FROM),
                              ("lr_schedule", LR_SCHEDULES), ("normalization", (None, *NORMALIZATIONS)),
                              ("advantage_std", ADVANTAGE_STD), ("logits_gemm", LOGITS_GEMMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name, lo in (("prompts_per_step", 1), ("samples_per_prompt", 1), ("max_new_tokens", 1), ("top_k", 0),
                         ("max_sampling_rounds", 1), ("overlong_buffer", 0), ("updates_per_batch", 1),
                         ("micro_batch_size", 1), ("warmup_steps", 0), ("steps", 0), ("seed", 0),
                         ("checkpoint_every", 0), ("max_num_seqs", 1), ("max_model_len", 2)):
            _integer(name, getattr(self, name), lo)
        for name in ("dynamic_sampling", "batch_invariant", "activation_checkpointing", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        _number("overlong_penalty", self.overlong_penalty, lo=0.0)
        _number("lr", self.lr, lo=0.0, lo_open=True)
        _number("adam_eps", self.adam_eps, lo=0.0)
        _number("weight_decay", self.weight_decay, lo=0.0)
        _number("grad_clip", self.grad_clip, lo=0.0)
        _number("min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
        for name in ("eps_low", "eps_high"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), lo=0.0)
        if self.eps_low is not None and self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1, got {self.eps_low}")
        if self.method == "grpo" and self.normalization not in (None, "sequence"):
            raise ValueError(f"normalization must be 'sequence' (or null) with method 'grpo', got "
                             f"{self.normalization!r}")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2):
            raise ValueError(f"betas must be a list of two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _number(f"betas[{i}]", beta, lo=0.0, hi=1.0, hi_open=True)
        self.betas = [float(b) for b in self.betas]
        if self.repetition_stop is not None:
            if not (isinstance(self.repetition_stop, (list, tuple)) and len(self.repetition_stop) == 2):
                raise ValueError(f"repetition_stop must be [n, p] or null, got {self.repetition_stop!r}")
            _integer("repetition_stop[0]", self.repetition_stop[0], 1)
            _number("repetition_stop[1]", self.repetition_stop[1], lo=0.0, hi=1.0, hi_open=True)
            self.repetition_stop = [int(self.repetition_stop[0]), float(self.repetition_stop[1])]
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be <= max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.advantage_std == "sample" and self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 with advantage_std 'sample' (a group of one has no "
                             "spread); use advantage_std null")
        if self.updates_per_batch > self.prompts_per_step * self.samples_per_prompt:
            raise ValueError(f"updates_per_batch ({self.updates_per_batch}) exceeds the sequences of a batch "
                             f"(prompts_per_step * samples_per_prompt = {self.prompts_per_step * self.samples_per_prompt})")
        if self.logits_gemm == "cublas" and self.dtype != "bfloat16":
            raise ValueError(f"logits_gemm 'cublas' needs dtype 'bfloat16' (16-bit hidden states and head), got "
                             f"{self.dtype!r}")
        if self.logits_gemm is not None and self.backend == "torch":
            raise ValueError("logits_gemm applies to the triton backend; leave it null with backend 'torch'")
        if self.batch_invariant and self.old_logprobs != "recompute":
            raise ValueError("batch_invariant needs old_logprobs 'recompute' (the engine's log-probs come from "
                             "other kernels, so they cannot match the training forward bit for bit)")

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "TrainerConfig":
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a table/dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> "TrainerConfig":
        """Read a .json or .toml file (TOML has no null: leave a field out for its default)."""
        path = os.fspath(path)
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                values = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path) as f:
                values = json.load(f)
        else:
            raise ValueError(f"config file must end in .json or .toml, got {path!r}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainerConfig":
        return dataclasses.replace(self, **changes)


def _string(name, value):
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


def _integer(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _number(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value != value or (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        hi_s = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {lo_s or '(-inf'}, {hi_s or 'inf)'}, got {value!r}")
