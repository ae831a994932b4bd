"""The RL loop (docs/trainer.md): one step takes a generation batch through

    prompts --Engine--> G completions each, with the engine's log-probs
            --reward (a plain Python callable), DAPO's overlong penalty--> rewards [P, G]
            --dynamic sampling: drop groups whose rewards are all equal, sample more prompts--> P groups
            --group_advantages--> advantages
            --(old_logprobs="recompute": the training forward over the batch, in rollout order, no backward)
            --shuffle, split into mu mini-batches--> mu optimizer steps (micro-batches accumulate gradients;
              policy_loss normalised by the mini-batch's global token / sequence count)
            --engine.update_weights--> the next step samples from the new policy

and writes one JSONL record of metrics (docs/trainer.md lists them). The engine holds its own copy of the
model (generation never sees autograd or activation-checkpointing hooks) and receives the trainer's weights in
place after every step.

Data parallel: with torch.distributed initialised, every rank samples its own prompts (seeds differ by rank),
token and sequence counts are summed over `dp_group` and each rank's loss is multiplied by the group's size,
because data-parallel gradient reduction (DDP, FSDP2 with parallelize's divide factor) averages over it.
"""

import copy
import dataclasses
import math
import os
import random
import time

import torch
import torch.distributed as dist

from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainerConfig
from .head_loss import fused_head_loss
from .logprobs import fused_logprobs
from .loss import global_count, group_advantages, overlong_penalty, policy_loss
from .metrics import MetricsLog, logprob_agreement, plot_metrics
from .tasks import make_task


@dataclasses.dataclass
class Group:
    """The G completions of one prompt: tokens, the engine's log-probs, finish reasons, the task's scores and
    the rewards the advantages use (scores plus the overlong penalty)."""
    prompt: list
    completions: list
    logprobs: list
    finish_reasons: list
    scores: list
    rewards: list


@dataclasses.dataclass
class Sample:
    prompt: list
    completion: list
    engine_logprobs: list
    advantage: float
    old_logprobs: list | None = None


@dataclasses.dataclass
class Batch:
    """Sequences as right-padded tensors: the model reads input_ids [b, L] (prompt + completion, last token
    dropped) and predicts targets [b, L]; mask marks the completion's tokens among the targets."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: list
    engine_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor


def make_batch(samples, device) -> Batch:
    lengths = [len(s.prompt) + len(s.completion) - 1 for s in samples]
    b, L = len(samples), max(lengths)
    ids = torch.zeros(b, L + 1, dtype=torch.long)
    mask = torch.zeros(b, L, dtype=torch.bool)
    engine = torch.zeros(b, L)
    old = torch.zeros(b, L)
    for i, s in enumerate(samples):
        tokens = s.prompt + s.completion
        ids[i, :len(tokens)] = torch.tensor(tokens)
        start, end = len(s.prompt) - 1, len(tokens) - 1
        mask[i, start:end] = True
        engine[i, start:end] = torch.tensor(s.engine_logprobs)
        old[i, start:end] = torch.tensor(s.engine_logprobs if s.old_logprobs is None else s.old_logprobs)
    adv = torch.tensor([s.advantage for s in samples])
    return Batch(ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device), lengths, engine.to(device),
                 old.to(device), adv.to(device))


def token_logprobs(model, input_ids, targets, mask, *, logprobs_from="fused", backend=None):
    """Log-probs and entropies [b, L] (fp32, 0 off the mask) of `targets` under `model` reading `input_ids`.

    "fused": the final hidden states of the masked positions through fused_logprobs with the LM head's weight
    (fp32-accurate, no [b, L, V] logits); "logits": the model's own forward (any model whose forward returns
    logits, e.g. a parallelized one), log_softmax in fp32 over the masked positions. The entropies carry no
    gradient (they are a metric here)."""
    if logprobs_from == "fused":
        hidden = model.model(input_ids)
        lp, ent = fused_logprobs(hidden[mask], model.lm_head.weight, targets[mask], return_entropy=True,
                                 backend=_head_backend(backend))
    else:
        logp_all = torch.log_softmax(model(input_ids)[mask].float(), dim=-1)
        lp = logp_all.gather(1, targets[mask][:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return _scatter(mask, lp), _scatter(mask, ent.detach())


def _scatter(mask, values):
    """values [mask.sum()] into a [b, L] fp32 tensor, 0 off the mask (differentiable)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)


def _head_backend(backend):
    """The LM-head loss ops' backend for the model's `backend` setting (they have triton and torch only)."""
    return backend if backend in ("triton", "torch") else None


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def lr_lambda(config: TrainerConfig):
    """The learning-rate factor of optimizer step s: linear warm-up, then constant / linear / cosine decay to
    min_lr_ratio over the run's steps * updates_per_batch optimizer steps."""
    total = max(1, config.steps * config.updates_per_batch)
    warm, floor = config.warmup_steps, config.min_lr_ratio

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        if config.lr_schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class Trainer:
    """CISPO / DAPO / GRPO training of an M1ForCausalLM on a verifiable task (see the module docstring).

    Args:
        config: a TrainerConfig.
        model: the policy (default: built from the config, or loaded from config.init_checkpoint); it may be
            parallelized, then give engine_model too and set logprobs_from="logits".
        engine_model: the model the engine generates with (default: a copy of `model`, made before activation
            checkpointing is applied).
        task: a trainer.tasks.Task (default: from config.task and config.task_options).
        reward_fn: callable(prompt_ids, completion_ids) -> float (default: task.reward).
        dp_group: the data-parallel process group (default: the whole world when torch.distributed is
            initialised).
    """

    def __init__(self, config: TrainerConfig, model=None, *, engine_model=None, task=None, reward_fn=None,
                 dp_group=None):
        from m1_kernels.model import Engine
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.task = task if task is not None else make_task(config.task, **config.task_options)
        self.reward_fn = reward_fn if reward_fn is not None else self.task.reward
        if not callable(self.reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(self.reward_fn).__name__}")
        torch.manual_seed(config.seed)
        self.model = model if model is not None else self._build_model()
        if self.model.config.vocab_size < self.task.vocab_size:
            raise ValueError(f"the model's vocab_size {self.model.config.vocab_size} is smaller than the task's "
                             f"{self.task.vocab_size} (model_preset / model_overrides)")
        if engine_model is None:
            from torch.distributed.fsdp import FSDPModule
            if any(isinstance(m, FSDPModule) for m in self.model.modules()):
                raise ValueError("a parallelized model needs engine_model= (a plain copy for generation)")
            engine_model = copy.deepcopy(self.model)
        if config.logprobs_from == "fused" and not hasattr(self.model, "model"):
            raise ValueError("logprobs_from='fused' needs an M1ForCausalLM (model.model gives the hidden states)")
        self.engine = Engine(engine_model.eval(), max_num_seqs=config.max_num_seqs,
                             max_model_len=config.max_model_len, cache_memory_bytes=1 << 30)
        if config.activation_checkpointing:
            from torch.distributed._composable import checkpoint
            for layer in self.model.model.layers:
                checkpoint(layer)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.dp_group = dp_group if dp_group is not None or not (dist.is_available() and dist.is_initialized()) \
            else dist.group.WORLD
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self.loss_scale = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        self.prompt_rng = random.Random(config.seed * 1_000_003 + self.dp_rank)
        self.step = 0
        self.checkpoint_dir = os.path.join(config.out_dir, "checkpoint")
        self.log = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"))
        if config.resume and has_checkpoint(self.checkpoint_dir):
            load_checkpoint(self.checkpoint_dir, self)
        if self.dp_rank == 0:
            self.log.truncate_after(self.step)

    def _build_model(self):
        from m1_kernels.model import M1Config, M1ForCausalLM
        cfg = self.config
        dtype = getattr(torch, cfg.dtype)
        if cfg.init_checkpoint is not None:
            return M1ForCausalLM.from_pretrained(cfg.init_checkpoint, dtype=dtype, device=self.device,
                                                 backend=cfg.backend)
        try:
            model_config = M1Config.preset(cfg.model_preset).replace(**cfg.model_overrides)
        except TypeError as exc:
            raise ValueError(f"model_overrides: {exc}") from exc
        with torch.device(self.device):
            model = M1ForCausalLM(model_config, backend=cfg.backend)
        return model.cast_parameters(dtype)

    def _seed(self, *parts) -> int:
        """A seed for this step's draws: a function of the run's seed, the step, `parts` and the rank."""
        value = self.config.seed
        for p in (self.step, *parts, self.dp_rank):
            value = (value * 1_000_003 + p + 7) % (1 << 61)
        return value

    # ------------------------------------------------------------------------------------------------
    # Rollouts

    def _sampling_params(self, seed):
        from m1_kernels.model import SamplingParams
        cfg = self.config
        return SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, max_tokens=cfg.max_new_tokens,
                              stop_token_ids=(self.task.eos_token_id,),
                              repetition_stop=tuple(cfg.repetition_stop) if cfg.repetition_stop else None, seed=seed)

    def _score(self, prompt, output) -> Group:
        cfg = self.config
        completions = [list(c.token_ids) for c in output.outputs]
        scores = [float(self.reward_fn(prompt, c)) for c in completions]
        rewards = list(scores)
        if cfg.overlong_buffer:
            penalty = overlong_penalty([len(c) for c in completions], cfg.max_new_tokens, cfg.overlong_buffer,
                                       cfg.overlong_penalty)
            rewards = [r + p for r, p in zip(rewards, penalty.tolist())]
        return Group(prompt, completions, [list(c.logprobs) for c in output.outputs],
                     [c.finish_reason for c in output.outputs], scores, rewards)

    def rollout(self):
        """(groups, metrics): P groups for the update (with dynamic sampling: only groups whose rewards
        differ, sampled over up to max_sampling_rounds rounds; fewer if the rounds run out), and metrics of the
        first round's samples (an unbiased look at the current policy)."""
        cfg = self.config
        kept, first = [], None
        rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
        for rnd in range(rounds):
            prompts = [self.task.sample(self.prompt_rng)[0] for _ in range(cfg.prompts_per_step - len(kept))]
            outputs = self.engine.generate(prompts, self._sampling_params(self._seed(rnd)), use_tqdm=False)
            groups = [self._score(p, o) for p, o in zip(prompts, outputs)]
            first = groups if first is None else first
            kept += [g for g in groups if not cfg.dynamic_sampling or len(set(g.rewards)) > 1]
            if len(kept) >= cfg.prompts_per_step:
                break
        scores = torch.tensor([s for g in first for s in g.scores])
        lengths = torch.tensor([len(c) for g in first for c in g.completions], dtype=torch.float32)
        reasons = [r for g in first for r in g.finish_reasons]
        metrics = {"reward_mean": scores.mean().item(), "reward_std": scores.std(correction=0).item(),
                   "response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
                   "response_length_min": lengths.min().item(),
                   "groups_kept_fraction": sum(len(set(g.rewards)) > 1 for g in first) / len(first),
                   "sampling_rounds": rnd + 1, "groups_trained": len(kept)}
        for reason in ("stop", "length", "repetition"):
            metrics[f"finish_{reason}_fraction"] = reasons.count(reason) / len(reasons)
        return kept, metrics

    # ------------------------------------------------------------------------------------------------
    # The training forward

    def _forward(self, input_ids, targets, mask):
        return token_logprobs(self.model, input_ids, targets, mask, logprobs_from=self.config.logprobs_from,
                              backend=self.config.backend)

    def sequence_logprobs(self, batch: Batch):
        """The training forward of a batch. Batch-invariant mode runs every sequence alone at its own length,
        so that a sequence's log-probs are the same bits in any batch."""
        if not self.config.batch_invariant:
            return self._forward(batch.input_ids, batch.targets, batch.mask)
        rows = [self._forward(batch.input_ids[i:i + 1, :n], batch.targets[i:i + 1, :n], batch.mask[i:i + 1, :n])
                for i, n in enumerate(batch.lengths)]
        L = batch.input_ids.shape[1]
        pad = torch.nn.functional.pad
        return (torch.cat([pad(lp, (0, L - lp.shape[1])) for lp, _ in rows]),
                torch.cat([pad(ent, (0, L - ent.shape[1])) for _, ent in rows]))

    def _head_loss(self, batch: Batch, loss_args, loss_kw):
        """(loss, log-probs [b, L], entropies [b, L]) of a batch through fused_head_loss: the LM head, log-probs
        and policy_loss in one pass (the head's gradients formed in its forward; policy_loss is a sum of
        per-token terms at fixed counts). Batch-invariant mode keeps the per-sequence forwards instead."""
        mask = batch.mask
        hidden = self.model.model(batch.input_ids)[mask]
        loss, lp, ent = fused_head_loss(hidden, self.model.lm_head.weight, batch.targets[mask],
                                        lambda flat: policy_loss(_scatter(mask, flat), *loss_args, **loss_kw)[0],
                                        return_entropy=True, backend=_head_backend(self.config.backend),
                                        logits_gemm=self.config.logits_gemm)
        return loss, _scatter(mask, lp), _scatter(mask, ent)

    # ------------------------------------------------------------------------------------------------
    # Updates

    def _samples(self, groups):
        cfg = self.config
        rewards = torch.tensor([g.rewards for g in groups])
        adv = group_advantages(rewards, std=cfg.advantage_std)
        samples = [Sample(g.prompt, c, lp, adv[i, j].item())
                   for i, g in enumerate(groups) for j, (c, lp) in enumerate(zip(g.completions, g.logprobs))]
        if cfg.old_logprobs == "recompute":
            # What a rollout worker computes: the training forward over the batch in rollout order. Batch-invariant
            # mode keeps autograd on (the graph is dropped at once) so that every op takes the training forward's
            # kernels: without gradients fused_moe runs short sequences on its few-token kernels, whose sums
            # differ from the general path's in the last bits.
            with torch.set_grad_enabled(cfg.batch_invariant):
                for micro in _chunks(samples, cfg.micro_batch_size):
                    batch = make_batch(micro, self.device)
                    lp, _ = self.sequence_logprobs(batch)
                    lp, mask = lp.detach().cpu(), batch.mask.cpu()  # one copy to the host, not one per row
                    for s, row, m in zip(micro, lp, mask):
                        s.old_logprobs = row[m].tolist()
        return samples

    def update(self, groups) -> dict:
        """mu optimizer steps on the samples of `groups` (shuffled, split into mini-batches)."""
        cfg = self.config
        samples = self._samples(groups)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self._seed(-1))).tolist()
        minibatches = [[samples[i] for i in part.tolist()]
                       for part in torch.tensor_split(torch.tensor(order), cfg.updates_per_batch)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums, tokens_total, losses, norms = {}, 0, [], []
        ratio_min, ratio_max = math.inf, -math.inf
        first_train, first_engine, first_old = [], [], []
        for k, minibatch in enumerate(minibatches):
            n_tokens = global_count(sum(len(s.completion) for s in minibatch), self.dp_group)
            n_sequences = global_count(len(minibatch), self.dp_group)
            loss_total = 0.0
            loss_kw = dict(method=cfg.method, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                           normalization=cfg.normalization, num_tokens=n_tokens, num_sequences=n_sequences)
            for micro in _chunks(minibatch, cfg.micro_batch_size):
                batch = make_batch(micro, self.device)
                loss_args = (batch.old_logprobs, batch.advantages, batch.mask)
                if cfg.logprobs_from == "fused" and not cfg.batch_invariant:
                    loss, lp, ent = self._head_loss(batch, loss_args, loss_kw)
                    _, m = policy_loss(lp, *loss_args, **loss_kw)    # the metrics (lp is detached)
                else:
                    lp, ent = self.sequence_logprobs(batch)
                    loss, m = policy_loss(lp, *loss_args, **loss_kw)
                (loss * self.loss_scale).backward()
                loss_total += loss.item()
                count = m["tokens"].item()
                tokens_total += count
                for key in ("clipped_fraction", "clipped_low_fraction", "clipped_high_fraction",
                            "ppo_masked_fraction", "cispo_ppo_differ_fraction", "ratio_mean"):
                    sums[key] = sums.get(key, 0.0) + m[key].item() * count
                sums["entropy_mean"] = sums.get("entropy_mean", 0.0) + ent[batch.mask].sum().item()
                if count:
                    ratio_min, ratio_max = min(ratio_min, m["ratio_min"].item()), max(ratio_max, m["ratio_max"].item())
                if k == 0:   # the first update runs at the rollout's weights: train vs rollout agreement
                    first_train.append(lp.detach()[batch.mask])
                    first_engine.append(batch.engine_logprobs[batch.mask])
                    first_old.append(batch.old_logprobs[batch.mask])
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_total)
            norms.append(norm.item())
        metrics = {key: value / max(tokens_total, 1) for key, value in sums.items()}
        metrics.update(loss=sum(losses) / len(losses), grad_norm=sum(norms) / len(norms), grad_norm_max=max(norms),
                       ratio_min=ratio_min, ratio_max=ratio_max, trained_tokens=tokens_total)
        train = torch.cat(first_train)
        metrics.update({f"engine_{k}": v for k, v in logprob_agreement(train, torch.cat(first_engine)).items()})
        if cfg.old_logprobs == "recompute":
            metrics.update({f"old_{k}": v for k, v in logprob_agreement(train, torch.cat(first_old)).items()})
        return metrics

    # ------------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One generation batch: rollouts, mu updates, new weights into the engine; returns (and logs) its
        metrics."""
        t0 = time.perf_counter()
        groups, record = self.rollout()
        t1 = time.perf_counter()
        record = {"step": self.step, **record, "lr": self.scheduler.get_last_lr()[0]}
        if groups:
            self.model.train()
            record.update(self.update(groups))
            self.engine.update_weights(self.model)
        else:
            record["skipped_update"] = True   # every group's rewards were equal: no signal this step
        t2 = time.perf_counter()
        record.update(rollout_s=t1 - t0, train_s=t2 - t1)
        if self.dp_rank == 0:
            self.log.write(record)
        self.step += 1
        return record

    def save(self):
        save_checkpoint(self.checkpoint_dir, self)

    def train(self, steps: int | None = None) -> list:
        """Run until config.steps (or `steps` more), checkpointing every checkpoint_every steps and at the end;
        writes metrics.png next to metrics.jsonl. Returns this call's records."""
        cfg = self.config
        end = cfg.steps if steps is None else self.step + steps
        bar = None
        if cfg.progress and self.dp_rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=self.step, desc="RL steps", dynamic_ncols=True)
        records = []
        try:
            while self.step < end:
                record = self.train_step()
                records.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", len=f"{record['response_length_mean']:.1f}",
                                    refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        if self.dp_rank == 0 and os.path.exists(self.log.path):
            plot_metrics(self.log.path, os.path.join(cfg.out_dir, "metrics.png"), title=f"{cfg.method} on {cfg.task}")
        return records
