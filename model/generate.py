"""`python -m m1_kernels.model.generate`: generate from a checkpoint or a random preset model on the engine.

    python -m m1_kernels.model.generate --preset tiny --prompt 1,2,3 --prompt 4 --max-tokens 8
    python -m m1_kernels.model.generate --checkpoint /path/to/folder --n 4 --temperature 0.8 --seed 0

Each --prompt is one prompt of comma-separated token ids (no tokenizer here). Prints every completion
with its finish reason and token log-probabilities, then the throughput. Bad arguments (unknown
presets, malformed prompts, sampling values out of range, a model larger than the device's free
memory) end with a usage error, not a traceback.
"""

import argparse
import os
import time

import torch

from .config import M1Config


def _prompt(text):
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids (e.g. 1,2,3)")
    return ids


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _parameter_bytes(config, dtype) -> int:
    from .checkpoint import parameters_on_meta
    from .modeling import M1ForCausalLM
    with parameters_on_meta():
        model = M1ForCausalLM(config)
    return model.parameter_counts()["total"] * torch.empty(0, dtype=dtype).element_size()


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m m1_kernels.model.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="checkpoint folder (config.json + safetensors)")
    source.add_argument("--preset", default="tiny", help="random model of this M1Config preset (default tiny)")
    parser.add_argument("--prompt", type=_prompt, action="append",
                        help="comma-separated token ids (repeatable: several prompts; default 1,2,3,4)")
    parser.add_argument("--n", type=int, default=1, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", type=int, action="append", default=[], help="stop token id (repeatable)")
    parser.add_argument("--repetition-stop", type=float, nargs=2, metavar=("N", "P"),
                        help="end a completion after N tokens in a row each drawn with probability > P")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--backend", choices=("cuda", "triton", "torch"), default=None, help="kernel backend")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: all completions at once (<= 256)")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: longest prompt + max tokens")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from .engine import Engine
    from .modeling import M1ForCausalLM
    from .sampling import SamplingParams

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        config = M1Config.from_pretrained(args.checkpoint) if args.checkpoint else M1Config.preset(args.preset)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    need, free = _parameter_bytes(config, dtype), _free_bytes(device)
    if need > free:
        what = f"checkpoint {args.checkpoint}" if args.checkpoint else f"preset {args.preset!r}"
        parser.error(f"{what} needs {need / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} weights; "
                     f"{device} has {free / 2**30:.1f} GiB free")
    prompts = args.prompt or [[1, 2, 3, 4]]
    try:
        repetition = (int(args.repetition_stop[0]), args.repetition_stop[1]) if args.repetition_stop else None
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, stop_token_ids=args.stop, repetition_stop=repetition,
                                seed=args.seed)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))

    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = M1ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device, backend=args.backend)
    else:
        with torch.device(device):
            model = M1ForCausalLM(config, backend=args.backend)
        model.cast_parameters(dtype)
    model.eval()
    longest = max(len(p) for p in prompts)
    max_model_len = args.max_model_len or min(config.max_position_embeddings, longest + args.max_tokens)
    try:
        engine = Engine(model, max_num_seqs=args.max_num_seqs or min(256, len(prompts) * args.n),
                        max_model_len=max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                        cuda_graphs=False if args.eager else None)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - start
    for out in outputs:
        for c in out.outputs:
            print(f"prompt {out.prompt_token_ids} [{c.index}] -> {c.token_ids} ({c.finish_reason})")
            print("  logprobs " + " ".join(f"{x:.3f}" for x in c.logprobs))
    new = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    print(f"{new} tokens in {elapsed:.3f} s ({new / elapsed:.1f} tokens/s, {len(prompts)} prompts x n = {args.n})")


if __name__ == "__main__":
    main()
