"""Batched generation with the hybrid cache: greedy or sampled, with token log-probabilities.

Sampling: logits / temperature, then top-k, then top-p (nucleus), then a draw; temperature 0 is greedy.
The returned log-probability of a token is that of the model's own distribution (log_softmax of the raw
fp32 logits, before temperature, top-k and top-p): what an RL trainer compares its policy against.

A row stops at a stop token (kept in the output), after `max_new_tokens`, or — with
`repetition_stop=(n, p)` — once its last n tokens were each drawn with probability above p: the M1
report cuts degenerate repetition this way (n = 3000, p = 0.99).

`python -m m1_kernels.model.generate` runs a small random model (`--preset tiny`) or a checkpoint folder.
"""

import argparse
import dataclasses
import time

import torch


@dataclasses.dataclass
class GenerationOutput:
    """tokens[b] / logprobs[b]: the new tokens of prompt b and their log-probabilities;
    finish_reasons[b]: "stop" (a stop token), "length" (max_new_tokens) or "repetition"."""
    tokens: list
    logprobs: list
    finish_reasons: list


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token per row of logits [B, V] (fp32): greedy for temperature 0, else filtered sampling."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop_tokens=(),
             repetition_stop=None, generator=None) -> GenerationOutput:
    """Generate continuations of a batch of prompts of any lengths.

    Args:
        model: an M1ForCausalLM.
        prompts: list of token-id lists (at least one token each).
        max_new_tokens: the most tokens generated per prompt.
        temperature, top_k, top_p: sampling (temperature 0 = greedy; top_k 0 and top_p 1 = no filter).
        stop_tokens: ids that end a row (the stop token is returned).
        repetition_stop: (n, p): end a row once its last n tokens each had probability > p.
        generator: torch.Generator for reproducible sampling.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repetition_stop is not None:
        run_len, threshold = repetition_stop
        if run_len < 1 or not 0 <= threshold < 1:
            raise ValueError(f"repetition_stop needs n >= 1 and 0 <= p < 1, got {repetition_stop}")
    device = model.lm_head.weight.device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = model.new_cache(B, max(lengths) + max_new_tokens)
    ids = torch.zeros(B, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    logits = model(ids.to(device), cache=cache, lengths=lengths, last_token_only=True)
    tokens, logprobs = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    reasons = ["length"] * B
    ends = [max_new_tokens] * B
    confident_run = torch.zeros(B, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = logits.float()
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]
        tokens.append(nxt)
        logprobs.append(logp)
        stopped = torch.isin(nxt, stops) & ~done
        repeated = torch.zeros_like(done)
        if repetition_stop is not None:
            confident_run = torch.where(logp.exp() > threshold, confident_run + 1, 0)
            repeated = (confident_run >= run_len) & ~done & ~stopped
        for b, (stop_b, repeat_b) in enumerate(zip(stopped.tolist(), repeated.tolist())):
            if stop_b or repeat_b:
                reasons[b], ends[b] = ("stop" if stop_b else "repetition"), len(tokens)
        done |= stopped | repeated
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        # Finished rows keep decoding (their output is cut below): one batch shape for every step.
        logits = model(nxt[:, None], cache=cache)[:, -1]
    tok = torch.stack(tokens, dim=1).tolist()
    lp = torch.stack(logprobs, dim=1).tolist()
    return GenerationOutput([t[:n] for t, n in zip(tok, ends)], [x[:n] for x, n in zip(lp, ends)], reasons)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m m1_kernels.model.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="checkpoint folder (config.json + safetensors)")
    source.add_argument("--preset", default="tiny", help="random model of this M1Config preset (default tiny)")
    parser.add_argument("--prompt", action="append", help="comma-separated token ids (repeatable: a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", type=int, action="append", default=[], help="stop token id (repeatable)")
    parser.add_argument("--repetition-stop", type=float, nargs=2, metavar=("N", "P"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--backend", default=None, help="kernel backend (cuda, triton, torch)")
    args = parser.parse_args(argv)

    from .config import M1Config
    from .modeling import M1ForCausalLM

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.checkpoint:
        model = M1ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=args.device, backend=args.backend)
    else:
        with torch.device(args.device):
            model = M1ForCausalLM(M1Config.preset(args.preset), backend=args.backend)
        if dtype:
            model.cast_parameters(dtype)
    prompts = [[int(t) for t in p.split(",")] for p in (args.prompt or ["1,2,3,4"])]
    repetition = (int(args.repetition_stop[0]), args.repetition_stop[1]) if args.repetition_stop else None
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=args.stop, repetition_stop=repetition,
                   generator=torch.Generator(args.device).manual_seed(args.seed))
    elapsed = time.perf_counter() - start
    for b, p in enumerate(prompts):
        print(f"prompt {p} -> {out.tokens[b]} ({out.finish_reasons[b]})")
        print("  logprobs " + " ".join(f"{x:.3f}" for x in out.logprobs[b]))
    new = sum(len(t) for t in out.tokens)
    print(f"{new} tokens in {elapsed:.3f} s ({new / elapsed:.1f} tokens/s, batch {len(prompts)})")


if __name__ == "__main__":
    main()
