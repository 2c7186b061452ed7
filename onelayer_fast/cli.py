"""`onelayer-fast` command line: argument parsing only; the work happens in the library."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .trainer import GRPOConfig

# Flags generated from GRPOConfig's fields, so the CLI and the config cannot drift apart.
_PARSERS = {"int": int, "float": float, "str": str}
_ALIASES = {"max_steps": ["--steps"], "per_device_train_batch_size": ["--batch-size"]}
_HAS_ALGO = any(f.name == "algo" for f in dataclasses.fields(GRPOConfig))


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    for field in dataclasses.fields(GRPOConfig):
        if field.name in exclude:
            continue
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

    sweep = commands.add_parser("sweep", help="Base, Full and one single-layer run per layer; contribution table and plot")
    sweep.add_argument("--model", required=True, help="a preset name or a local Hugging Face model directory")
    sweep.add_argument("--task", default="arithmetic", help="the task name (arithmetic | jsonl | ...)")
    sweep.add_argument("--task-path", default=None, help="the data file of file-backed tasks (jsonl)")
    sweep.add_argument("--layers", default="middle",
                       help="all | middle (drop n//3 layers from each end) | a list such as 0,5,10-14 (negative: from the end)")
    sweep.add_argument("--out", required=True, help="the sweep directory (runs/, results.csv, results.json, contribution.png)")
    _add_eval_flags(sweep)
    sweep.add_argument("--metric", default="accuracy", choices=["accuracy", "mean_reward"],
                       help="what Base / Full / Single(i) and the contribution are measured in")
    if not _HAS_ALGO:  # otherwise --algo is one of the generated config flags
        sweep.add_argument("--algo", default="grpo", help="the RL algorithm (this trainer: grpo only)")
    # output_dir, layer and mode are set per run by the sweep.
    _add_config_flags(sweep, exclude=("output_dir", "layer", "mode"))

    evaluate = commands.add_parser("eval", help="greedy evaluation of a model (optionally with a checkpoint) on a task")
    evaluate.add_argument("--model", required=True, help="the base model: preset name or local directory")
    evaluate.add_argument("--task", default=None, help="the task name (default: the checkpoint's task, else arithmetic)")
    evaluate.add_argument("--task-path", default=None, help="the data file of file-backed tasks (jsonl)")
    evaluate.add_argument("--checkpoint", default=None, help="a checkpoint directory or a run's output directory")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="the preset's init seed (default: the checkpoint's training seed, else "
                               f"{GRPOConfig.seed}, as train uses)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="default: the checkpoint's max_completion_length, else "
                               f"{GRPOConfig.max_completion_length}")
    _add_eval_flags(evaluate)
    return parser


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-size", type=int, default=200, help="held-out examples to evaluate (default: 200)")
    parser.add_argument("--eval-seed", type=int, default=0, help="which held-out examples (default: 0)")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generate call (default: 64)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _run_sweep(args: argparse.Namespace) -> None:
    from .sweep import SweepConfig, print_table, run_sweep

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if hasattr(args, f.name)}
    config = SweepConfig(model=args.model, out=args.out, task=args.task, task_path=args.task_path, layers=args.layers,
                         algo=args.algo, grpo=GRPOConfig(**values), eval_size=args.eval_size, eval_seed=args.eval_seed,
                         eval_batch_size=args.eval_batch_size, metric=args.metric, device=args.device, dtype=args.dtype)
    result = run_sweep(config)
    print_table(result)
    print(f"results: {result.out / 'results.csv'}, {result.out / 'results.json'}"
          + (f", {result.plot}" if result.plot else ""))


def _run_eval(args: argparse.Namespace) -> None:
    import torch

    from . import checkpoint
    from .evaluate import evaluate
    from .presets import load_model
    from .sweep import DTYPES
    from .tasks import eval_examples, get_task

    meta = checkpoint.read_meta(args.checkpoint) if args.checkpoint else {}
    trained = meta.get("config", {})
    if meta.get("base_model") and meta["base_model"] != args.model:
        print(f"note: {args.checkpoint} was trained on {meta['base_model']!r}, evaluating on {args.model!r}", file=sys.stderr)
    seed = args.seed if args.seed is not None else trained.get("seed", GRPOConfig.seed)
    max_new_tokens = args.max_new_tokens or trained.get("max_completion_length", GRPOConfig.max_completion_length)
    task = get_task(args.task or meta.get("task", "arithmetic"), args.task_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model(args.model, seed=seed, dtype=DTYPES[args.dtype])
    if args.checkpoint:
        checkpoint.load_layer(model, args.checkpoint)
    examples = eval_examples(task, args.eval_size, seed=args.eval_seed)
    result = evaluate(model.to(device), tokenizer, task, examples, batch_size=args.eval_batch_size,
                      max_new_tokens=max_new_tokens)
    print(f"{args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {task.name}: "
          f"accuracy {result.accuracy:.4f} ({round(result.accuracy * result.n)}/{result.n}), "
          f"mean reward {result.mean_reward:.4f}, {result.seconds:.1f} s")


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
            # A preset is rebuilt from the seed it was trained with, or the layer lands on other weights.
            trained_seed = checkpoint.read_meta(args.checkpoint).get("config", {}).get("seed", GRPOConfig.seed)
            model, tokenizer = load_model(args.model, seed=trained_seed)
            out = checkpoint.merge_checkpoint(model, args.checkpoint, args.out, tokenizer=tokenizer)
            print(f"merged model written to {out}")
        elif args.command == "sweep":
            _run_sweep(args)
        elif args.command == "eval":
            _run_eval(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"onelayer-fast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
