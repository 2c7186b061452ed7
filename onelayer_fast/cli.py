"""`onelayer-fast` command line: argument parsing only; the work happens in the library."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .trainer import GRPOConfig

# Flags generated from GRPOConfig's fields, so the CLI and the config cannot drift apart.
_PARSERS = {"int": int, "float": float, "str": str}
_ALIASES = {"max_steps": ["--steps"], "per_device_train_batch_size": ["--batch-size"]}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(GRPOConfig):
        base = str(field.type).split("|")[0].strip()
        flags = [f"--{field.name.replace('_', '-')}", *_ALIASES.get(field.name, [])]
        parser.add_argument(*flags, dest=field.name, type=_PARSERS[base], default=field.default,
                            help=f"(default: {field.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onelayer-fast", description="Single-layer GRPO post-training of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="GRPO-train one layer (or every parameter with --mode full)")
    train.add_argument("--model", default="tiny", help="a preset name or a local Hugging Face model directory")
    train.add_argument("--task", default="arithmetic", help="arithmetic | jsonl")
    train.add_argument("--task-path", default=None, help="the JSONL file for --task jsonl")
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --output-dir")
    _add_config_flags(train)

    merge = commands.add_parser("merge", help="apply a one-layer checkpoint to its base model and save it whole")
    merge.add_argument("--model", required=True, help="the base model: preset name or local directory")
    merge.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run's output directory")
    merge.add_argument("--out", required=True, help="where to write the merged Hugging Face model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import checkpoint
    from .presets import load_model

    try:
        if args.command == "train":
            from .tasks import get_task
            from .trainer import GRPOTrainer

            config = GRPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig)})
            model, tokenizer = load_model(args.model, seed=config.seed)
            task = get_task(args.task, args.task_path)
            trainer = GRPOTrainer(model, tokenizer, task, config, base_model=args.model, resume=not args.no_resume)
            records = trainer.train()
            if records:
                first, last = records[0], records[-1]
                print(f"done: {trainer.step} steps in {config.output_dir}; reward {first['reward_mean']:.3f} -> "
                      f"{last['reward_mean']:.3f}, {last['tokens_per_second']:.0f} tokens/s")
            else:
                print(f"nothing to do: {config.output_dir} already holds step {trainer.step} of {config.max_steps}")
        elif args.command == "merge":
            model, tokenizer = load_model(args.model)
            out = checkpoint.merge_checkpoint(model, args.checkpoint, args.out, tokenizer=tokenizer)
            print(f"merged model written to {out}")
    except (ValueError, FileNotFoundError) as error:
        print(f"onelayer-fast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
