"""`python -m m1_kernels.trainer --config FILE [--set FIELD=VALUE ...]`: RL training from a JSON or TOML
config (the fields of trainer.config.TrainerConfig), with a progress bar; metrics.jsonl, metrics.png and
checkpoint/ go to the config's out_dir, and a run with the same out_dir resumes from its checkpoint.
"""

import argparse
import json
import sys

from .config import TrainerConfig


def _parse_set(item):
    if "=" not in item:
        raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value       # a bare string


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m m1_kernels.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a .json or .toml file of TrainerConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one field (VALUE parsed as JSON, else taken as a string); repeatable")
    args = parser.parse_args(argv)
    try:
        config = TrainerConfig.from_file(args.config)
        if args.set:
            config = TrainerConfig.from_dict({**config.to_dict(), **dict(_parse_set(s) for s in args.set)})
    except (ValueError, TypeError, OSError) as exc:
        print(f"bad config: {exc}", file=sys.stderr)
        return 2
    from .loop import Trainer
    trainer = Trainer(config)
    records = trainer.train()
    if records:
        last = records[-1]
        print(f"step {last['step']}: reward {last['reward_mean']:.3f}, response length "
              f"{last['response_length_mean']:.1f}; metrics in {trainer.log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
