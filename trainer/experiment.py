"""CISPO against DAPO and GRPO on a verifiable toy task, as in the M1 report's Fig. 2 (CISPO matched DAPO in
half the steps there), at a size that runs in minutes on one GPU:

1. A small M1-architecture model (hidden 128, 4 layers: 3 lightning + 1 softmax, 4 experts top-2, vocabulary
   48) learns the task's format in a supervised warm-up, stopped once its sampled accuracy (temperature 1,
   what RL's reward measures) reaches `--warmup-target` (or after `--warmup-steps`); the checkpoint is saved.
2. From that checkpoint, with the same settings (P prompts x G samples per step, mu = 4 off-policy mini-batch
   updates per generation batch, one learning rate): CISPO (no lower bound, eps_high 0.28, token
   normalisation, dynamic sampling), DAPO (PPO-clip with clip-higher 0.2 / 0.28, token normalisation, dynamic
   sampling) and GRPO (PPO-clip 0.2 / 0.2, per-sequence normalisation, no dynamic sampling); 3 seeds each (the
   seed draws the prompts and samples; the start is the same), in parallel processes.
3. Reward (the first sampling round's mean: the current policy's accuracy) against training steps, steps to
   reach each threshold (first step whose 3-step running mean reaches it), spread over seeds; one JSON and one
   plot named <device>-CISPO-vs-DAPO-GRPO.{json,png} in --out.

    python -m m1_kernels.trainer.experiment --out bench/results            # the GPU run
    python -m m1_kernels.trainer.experiment --out /tmp/cispo --smoke        # CPU, tiny, a minute or two
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time

import torch

from .config import TrainerConfig
from .tasks import make_task

TASK = dict(task="reverse", task_options=dict(min_len=3, max_len=6, alphabet=8))
MODEL = dict(vocab_size=48, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, rotary_dim=16, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2,
             layer_types=["linear_attention"] * 3 + ["full_attention"], max_position_embeddings=256)
SMOKE_MODEL = dict(MODEL, hidden_size=64, head_dim=16, rotary_dim=8, intermediate_size=64)
METHODS = {
    "CISPO": dict(method="cispo", eps_low=None, eps_high=0.28, dynamic_sampling=True),
    "DAPO": dict(method="ppo", eps_low=0.2, eps_high=0.28, dynamic_sampling=True),
    "GRPO": dict(method="grpo", eps_low=0.2, eps_high=0.2, dynamic_sampling=False),
}
COMMON = dict(**TASK, prompts_per_step=16, samples_per_prompt=8, max_new_tokens=10, updates_per_batch=4,
              micro_batch_size=128, lr=3e-4, grad_clip=1.0, temperature=1.0, max_num_seqs=128, max_model_len=32,
              resume=False, progress=False)
# The smoke run's task is easy enough that a few warm-up steps give non-zero rewards (so the updates run).
SMOKE = dict(task_options=dict(min_len=1, max_len=2, alphabet=3), prompts_per_step=4, samples_per_prompt=4,
             max_new_tokens=8, max_sampling_rounds=2, max_num_seqs=16)
WARMUP_CHECK_EVERY = 5      # warm-up steps between accuracy checks (the accuracy rises steeply once it rises)
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
WINDOW = 3


def sampled_accuracy(engine, task, n, seed):
    """Mean reward of one temperature-1 completion for each of n fresh prompts."""
    from m1_kernels.model import SamplingParams
    rng = random.Random(seed)
    prompts = [task.sample(rng)[0] for _ in range(n)]
    params = SamplingParams(n=1, temperature=1.0, max_tokens=COMMON["max_new_tokens"],
                            stop_token_ids=(task.eos_token_id,), seed=seed)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    return sum(task.reward(p, o.outputs[0].token_ids) for p, o in zip(prompts, outputs)) / n


def warm_up(folder, device, model_overrides, task_options, max_steps, target, seed=0):
    """Supervised warm-up until the sampled accuracy reaches `target` (checked every WARMUP_CHECK_EVERY steps on
    128 prompts); saves the model to `folder`. Returns a summary."""
    from m1_kernels.model import Engine, M1Config, M1ForCausalLM

    from .warmup import supervised_warmup
    task = make_task(TASK["task"], **task_options)
    torch.manual_seed(seed)
    with torch.device(device):
        model = M1ForCausalLM(M1Config.preset("tiny").replace(**model_overrides))
    engine = Engine(model, max_num_seqs=128, max_model_len=COMMON["max_model_len"], cache_memory_bytes=1 << 30)
    accuracy = [(0, sampled_accuracy(engine, task, 128, seed=10_000))]

    def stop(step, loss):
        if (step + 1) % WARMUP_CHECK_EVERY:
            return False
        engine.update_weights(model)   # the engine runs this very model: only its prefix cache is dropped
        accuracy.append((step + 1, sampled_accuracy(engine, task, 128, seed=10_000 + step)))
        return accuracy[-1][1] >= target

    t0 = time.perf_counter()
    losses = supervised_warmup(model, task, steps=max_steps, batch_size=64, lr=3e-3, seed=seed, stop=stop)
    model.save_pretrained(folder)
    return {"steps": len(losses), "final_loss": losses[-1] if losses else None, "accuracy": accuracy,
            "target": target, "seconds": time.perf_counter() - t0}


def run_one(job):
    """One RL run (a process of its own under --jobs); returns its per-step records."""
    method, seed, checkpoint, out, steps, device, smoke = job
    from .loop import Trainer
    settings = {**COMMON, **(SMOKE if smoke else {}), **METHODS[method]}
    config = TrainerConfig(**settings, init_checkpoint=checkpoint, device=device, seed=seed, steps=steps,
                           out_dir=os.path.join(out, f"{method}-seed{seed}"))
    t0 = time.perf_counter()
    records = Trainer(config).train()
    return method, seed, records, time.perf_counter() - t0


def steps_to(rewards, threshold):
    """First step whose running mean over WINDOW steps reaches threshold (None: never)."""
    for i in range(len(rewards)):
        window = rewards[max(0, i - WINDOW + 1):i + 1]
        if sum(window) / len(window) >= threshold:
            return i
    return None


def summarize(runs):
    """Per method: reward curves per seed, their mean and spread, steps to each threshold, the final reward
    (mean of the last 5 steps) and the train-vs-engine agreement."""
    out = {}
    for method in METHODS:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        curves = [r["reward"] for r in mine]
        steps = min(len(c) for c in curves)
        per_step = list(zip(*(c[:steps] for c in curves)))
        finals = [statistics.fmean(c[-5:]) for c in curves]
        to = {str(t): [steps_to(c, t) for c in curves] for t in THRESHOLDS}
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "reward_mean": [statistics.fmean(s) for s in per_step],
            "reward_min": [min(s) for s in per_step], "reward_max": [max(s) for s in per_step],
            "reward_std_over_seeds": [statistics.pstdev(s) for s in per_step],
            "final_reward": {"mean": statistics.fmean(finals), "std": statistics.pstdev(finals), "per_seed": finals},
            "steps_to_threshold": to,
            "steps_to_threshold_mean": {t: (statistics.fmean(v) if all(x is not None for x in v) else None)
                                        for t, v in to.items()},
            "prompts_sampled_per_step": statistics.fmean(x for r in mine for x in r["groups_sampled"]),
            "engine_prob_pearson_min": min(x for r in mine for x in r["engine_prob_pearson"]),
            "seconds": [r["seconds"] for r in mine],
        }
    return out


def plot(summary, runs, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"CISPO": "tab:red", "DAPO": "tab:blue", "GRPO": "tab:green"}
    for method, s in summary.items():
        xs = list(range(len(s["reward_mean"])))
        ax.plot(xs, s["reward_mean"], color=colors[method], lw=2, label=f"{method} (mean of {len(s['seeds'])} seeds)")
        ax.fill_between(xs, s["reward_min"], s["reward_max"], color=colors[method], alpha=0.15)
        for r in runs:
            if r["method"] == method:
                ax.plot(r["reward"], color=colors[method], lw=0.6, alpha=0.5)
    ax.set(xlabel="training step (one generation batch, 4 updates)", ylabel="reward (sampled accuracy)",
           title=title, ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m m1_kernels.trainer.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON and the plot")
    parser.add_argument("--runs", default=None,
                        help="folder for the warm-up checkpoint and each run's metrics and checkpoint "
                             "(default: a new temporary folder; the JSON holds every run's metrics anyway)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, 4 prompts x 4 samples, 3 steps per run, 1 seed (a CPU check)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default 40, smoke 3)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, smoke 1)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="most warm-up steps (default 600, smoke 60)")
    parser.add_argument("--warmup-target", type=float, default=0.25, help="warm-up stops at this sampled accuracy")
    parser.add_argument("--jobs", type=int, default=None,
                        help="RL runs in parallel processes (default: all of them on a GPU, whose launch-bound "
                             "runs interleave; 1 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.smoke else 40)
    seeds = args.seeds or (1 if args.smoke else 3)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (60 if args.smoke else 600)
    model = SMOKE_MODEL if args.smoke else MODEL
    from m1_kernels.bench.harness import device_name
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    runs_dir = args.runs or tempfile.mkdtemp(prefix="cispo-runs-")
    checkpoint = os.path.join(runs_dir, "warmup")
    t0 = time.perf_counter()
    print(f"runs in {runs_dir}; warm-up: at most {warmup_steps} steps, until sampled accuracy "
          f"{args.warmup_target}", flush=True)
    settings = {**COMMON, **(SMOKE if args.smoke else {})}
    warm = warm_up(checkpoint, device, model, settings["task_options"], warmup_steps, args.warmup_target)
    print(f"warm-up: {warm['steps']} steps, sampled accuracy {warm['accuracy'][-1][1]:.3f}, "
          f"{warm['seconds']:.1f} s", flush=True)
    jobs = [(m, s, checkpoint, runs_dir, steps, args.device, args.smoke) for m in METHODS for s in range(seeds)]
    runs = []
    context = multiprocessing.get_context("spawn")
    workers = args.jobs or (len(jobs) if device.type == "cuda" else 1)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context) as pool:
        for method, seed, records, seconds in pool.map(run_one, jobs):
            runs.append({"method": method, "seed": seed, "seconds": seconds,
                         "reward": [r["reward_mean"] for r in records],
                         "groups_sampled": [r["sampling_rounds"] for r in records],
                         "engine_prob_pearson": [r.get("engine_prob_pearson", 1.0) for r in records],
                         "records": records})
            print(f"{method} seed {seed}: reward {runs[-1]['reward'][0]:.3f} -> "
                  f"{statistics.fmean(runs[-1]['reward'][-5:]):.3f} in {seconds:.1f} s", flush=True)
    summary = summarize(runs)
    stem = os.path.join(args.out, f"{device_name(device)}-CISPO-vs-DAPO-GRPO")
    result = {"description": __doc__.split("\n\n")[0], "device": device_name(device), "smoke": args.smoke,
              "model": model,
              "settings": {**settings, "steps": steps}, "methods": METHODS, "warmup": warm,
              "thresholds": THRESHOLDS, "window": WINDOW, "summary": summary, "runs": runs,
              "total_seconds": time.perf_counter() - t0}
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    title = f"CISPO vs DAPO vs GRPO, {TASK['task']} task ({'smoke' if args.smoke else device_name(device)})"
    png = plot(summary, runs, stem + ".png", title)
    print(f"\n{'method':<8} {'final reward':>16} " + " ".join(f"{'steps to ' + str(t):>14}" for t in THRESHOLDS))
    for method, s in summary.items():
        to = " ".join(f"{str(s['steps_to_threshold'][str(t)]):>14}" for t in THRESHOLDS)
        print(f"{method:<8} {s['final_reward']['mean']:>9.3f} ± {s['final_reward']['std']:.3f} {to}")
    print(f"\nwrote {stem}.json" + (f" and {png}" if png else "") + f" ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
