"""`onelayer-fast` command line: argument parsing only; the work happens in the library."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from .trainer import GRPOConfig, RunSpec, finite_positive, flag

# Flags generated from the config dataclasses (GRPOConfig, RunSpec), so the CLI and the configs cannot drift
# apart: each field's type, default, choices and one-line help (its metadata) become its flag.
_ALIASES = {"max_steps": ["--steps"], "per_device_train_batch_size": ["--batch-size"]}
_NONE_WORDS = ("none", "null")


def _value_parser(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.strip().lower() in _NONE_WORDS:
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _field_kind(hint: Any) -> tuple[type, bool]:
    """(scalar type, whether None is allowed) of a field annotation such as `int`, `float | None`, `bool`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    kind = args[0] if args else hint
    if kind not in (int, float, str, bool):
        raise TypeError(f"the CLI cannot parse a config field of type {hint!r}")
    return kind, optional


def add_dataclass_flags(parser: argparse.ArgumentParser, config_class: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of `config_class` (or of the fields named in `only`)."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if only is not None and f.name not in only:
            continue
        kind, optional = _field_kind(hints[f.name])
        flags = [flag(f.name), *_ALIASES.get(f.name, [])]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".strip()
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=_value_parser(kind, optional), default=f.default,
                                choices=f.metadata.get("choices"), help=help_text)


def config_from_args(config_class: type, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onelayer-fast", description="Single-layer GRPO post-training of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="GRPO-train one layer (or every parameter with --mode full)")
    train.add_argument("--model", default="tiny", help="a preset name or a local Hugging Face model directory")
    train.add_argument("--task", default="arithmetic", help="arithmetic | jsonl")
    train.add_argument("--task-path", default=None, help="the JSONL file for --task jsonl")
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --output-dir")
    _add_dtype_flag(train)
    add_dataclass_flags(train, RunSpec)
    add_dataclass_flags(train, GRPOConfig)

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
    sweep.add_argument("--val-size", type=_int_at_least(1, "val_size"), default=100,
                       help="validation examples each arm's learning rate is selected on, scored only when "
                            "--learning-rates has several (default: 100)")
    sweep.add_argument("--learning-rates", type=_learning_rates, default=None,
                       help="a grid such as 5e-6,3e-5,2e-4: every arm trains at each, the best on validation is "
                            "reported (default: --learning-rate alone)")
    sweep.add_argument("--full-learning-rates", type=_learning_rates, default=None,
                       help="Full's own grid, when the whole model wants smaller rates than one layer "
                            "(default: --learning-rates)")
    sweep.add_argument("--seeds", type=_int_at_least(1, "seeds"), default=1,
                       help="training seeds per arm and rate (--seed, --seed + 1, ...); scores are means over them (default: 1)")
    sweep.add_argument("--metric", default="accuracy", choices=["accuracy", "mean_reward"],
                       help="what Base / Full / Single(i) and the contribution are measured in")
    sweep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    sweep.add_argument("--lanes", type=_lanes_value, default="auto",
                       help="single-layer runs trained at once on one shared model: N, or auto (as many as "
                            "--memory-budget-mib allows, in waves; default). 1: one after another")
    sweep.add_argument("--memory-budget-mib", type=_positive_float("memory_budget_mib"), default=None,
                       help="memory the auto lanes may plan into (default: 80%% of free CUDA memory, half the free RAM)")
    # Each run's output directory, mode and layer come from the sweep; only the checkpoint cadence is the user's.
    add_dataclass_flags(sweep, RunSpec, only=("save_steps", "save_total_limit"))
    add_dataclass_flags(sweep, GRPOConfig)
    from .sweep import EXECUTOR_FIELDS, SweepConfig

    add_dataclass_flags(sweep, SweepConfig, only=EXECUTOR_FIELDS)  # --executor, --ray-address, ...

    evaluate = commands.add_parser("eval", help="greedy evaluation of a model (optionally with a checkpoint) on a task")
    evaluate.add_argument("--model", required=True, help="the base model: preset name or local directory")
    evaluate.add_argument("--task", default=None, help="the task name (default: the checkpoint's task, else arithmetic)")
    evaluate.add_argument("--task-path", default=None, help="the data file of file-backed tasks (jsonl)")
    evaluate.add_argument("--checkpoint", default=None, help="a checkpoint directory or a run's output directory")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="the preset's init seed (default: the checkpoint's training seed, else "
                               f"{GRPOConfig.seed}, as train uses)")
    evaluate.add_argument("--max-new-tokens", type=_int_at_least(1, "max_new_tokens"), default=None,
                          help="default: the checkpoint's max_completion_length, else "
                               f"{GRPOConfig.max_completion_length}")
    _add_eval_flags(evaluate)
    return parser


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-size", type=_int_at_least(1, "eval_size"), default=200,
                        help="held-out examples to evaluate (default: 200)")
    parser.add_argument("--eval-seed", type=int, default=0, help="which held-out examples (default: 0)")
    parser.add_argument("--eval-batch-size", type=_int_at_least(1, "eval_batch_size"), default=64,
                        help="prompts per generate call (default: 64)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    _add_dtype_flag(parser)


def _add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="the model's weights and compute dtype (default: float32; float64: exact CPU checks)")


# Checked while parsing, so argparse names the flag and exits 2 before anything loads. The message also
# names the setting (eval_size, ...) as the library's own checks do.
def _int_at_least(minimum: int, name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}") from None
        if not finite_positive(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return value

    return parse


def _learning_rates(text: str) -> tuple[float, ...]:
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("learning_rates is empty: give at least one rate, e.g. 5e-6,3e-5,2e-4")
    rates = []
    for item in items:
        try:
            rate = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"learning_rates: {item!r} is not a number (e.g. 5e-6,3e-5,2e-4)") from None
        if not finite_positive(rate):
            raise argparse.ArgumentTypeError(f"learning_rates: every rate must be a finite number > 0, got {item!r}")
        rates.append(rate)
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"learning_rates has a rate twice: {text!r}")
    return tuple(rates)


def _lanes_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, got {value}")
    return value


def _run_sweep(args: argparse.Namespace) -> None:
    from .sweep import EXECUTOR_FIELDS, SweepConfig, print_table, resolve_device, run_sweep

    resolve_device(args.device, what="--device")  # SweepConfig checks it too, but cannot name the flag
    config = SweepConfig(model=args.model, out=args.out, task=args.task, task_path=args.task_path, layers=args.layers,
                         grpo=config_from_args(GRPOConfig, args), eval_size=args.eval_size, val_size=args.val_size,
                         learning_rates=args.learning_rates,
                         full_learning_rates=args.full_learning_rates, seeds=args.seeds, eval_seed=args.eval_seed, eval_batch_size=args.eval_batch_size, metric=args.metric,
                         device=args.device, dtype=args.dtype, progress=args.progress, save_steps=args.save_steps,
                         save_total_limit=args.save_total_limit, lanes=args.lanes,
                         memory_budget_mib=args.memory_budget_mib,
                         **{name: getattr(args, name) for name in EXECUTOR_FIELDS})
    result = run_sweep(config)
    print_table(result)
    written = [result.out / "results.csv", result.out / "results.json", *result.plots]
    if result.report_path is not None:
        written.append(result.report_path)
    print("results: " + ", ".join(str(path) for path in written))


def _run_eval(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .evaluate import evaluate
    from .models import load_model
    from .models.presets import check_model_source
    from .sweep import DTYPES, resolve_device
    from .tasks import eval_examples, get_task

    device = resolve_device(args.device, what="--device")
    check_model_source(args.model)
    meta = checkpoint.read_meta(args.checkpoint) if args.checkpoint else {}
    trained = meta.get("config", {})
    if meta.get("base_model") and meta["base_model"] != args.model:
        print(f"note: {args.checkpoint} was trained on {meta['base_model']!r}, evaluating on {args.model!r}", file=sys.stderr)
    seed = args.seed if args.seed is not None else trained.get("seed", GRPOConfig.seed)
    if args.max_new_tokens is not None:  # not `or`: an explicit value is never replaced by the default
        max_new_tokens = args.max_new_tokens
    else:
        max_new_tokens = trained.get("max_completion_length", GRPOConfig.max_completion_length)
    task = get_task(args.task or meta.get("task", "arithmetic"), args.task_path)
    model, tokenizer = load_model(args.model, seed=seed, dtype=DTYPES[args.dtype])
    if args.checkpoint:
        checkpoint.load_layer(model, args.checkpoint)
    examples = eval_examples(task, args.eval_size, seed=args.eval_seed)
    result = evaluate(model.to(device), tokenizer, task, examples, batch_size=args.eval_batch_size,
                      max_new_tokens=max_new_tokens)
    print(f"{args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {task.name}: "
          f"accuracy {result.accuracy:.4f} ({round(result.accuracy * result.n)}/{result.n}), "
          f"mean reward {result.mean_reward:.4f}, {result.seconds:.1f} s")


def _run_train(args: argparse.Namespace) -> int:
    """`train`, in one process or as one rank of a torchrun group (data parallel: distributed.py)."""
    from .distributed import PeerRankError, init_world
    from .models import load_model
    from .models.presets import check_model_source
    from .sweep import DTYPES
    from .tasks import get_task
    from .trainer import GRPOTrainer

    config = config_from_args(GRPOConfig, args)
    run = config_from_args(RunSpec, args)
    # Everything that needs no model first: a bad setting, model name or task file fails at once.
    config.validate()
    run.validate()
    check_model_source(args.model)
    task = get_task(args.task, args.task_path)
    world = init_world()  # a no-op World() without torchrun's environment
    try:
        model, tokenizer = load_model(args.model, seed=config.seed, dtype=DTYPES[args.dtype])
        if world.device is not None:  # under torchrun: this rank's device (cuda:LOCAL_RANK, or the CPU)
            model = model.to(world.device)
        trainer = GRPOTrainer(model, tokenizer, task, config, run, base_model=args.model, resume=not args.no_resume,
                              world=world)
        records = trainer.train()
    except PeerRankError as error:
        print(f"onelayer-fast: error: {error}", file=sys.stderr)
        return 1
    world.close()
    if not world.is_main:
        return 0
    ranks = f" on {world.size} ranks" if world.distributed else ""
    if records:
        first, last = records[0], records[-1]
        print(f"done: {trainer.step} steps in {run.output_dir}{ranks}; reward {first['reward_mean']:.3f} -> "
              f"{last['reward_mean']:.3f}, {last['tokens_per_second']:.0f} tokens/s")
    else:
        print(f"nothing to do: {run.output_dir} already holds step {trainer.step} of {config.max_steps}")
    return 0


# What a user's input can cause (a bad value, a missing, existing, wrong-kind or forbidden path, a sweep
# directory already in use): reported as one error line and exit status 2, never a traceback. Anything
# else is a bug, and its traceback is what a report needs.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _error_text(error: BaseException) -> str:
    """An OSError raised by the OS reads "[Errno 17] File exists: 'x'"; say "x: File exists" instead."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _check_merge_target(out: str) -> None:
    """merge_checkpoint refuses these too, but only after the model is loaded."""
    from pathlib import Path

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out}: already exists and is not an empty directory; merge writes a new model "
                         "directory, choose a new path")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a usage error (argparse printed it) or --help: return its code, as for any error
        return int(exit_.code or 0)
    from . import checkpoint
    from .models import load_model
    from .models.presets import check_model_source
    from .sweep import SweepBusyError

    try:
        if args.command == "train":
            return _run_train(args)
        elif args.command == "merge":
            _check_merge_target(args.out)
            check_model_source(args.model)
            # A preset is rebuilt from the seed it was trained with, or the layer lands on other weights.
            trained_seed = checkpoint.read_meta(args.checkpoint).get("config", {}).get("seed", GRPOConfig.seed)
            model, tokenizer = load_model(args.model, seed=trained_seed)
            out = checkpoint.merge_checkpoint(model, args.checkpoint, args.out, tokenizer=tokenizer)
            print(f"merged model written to {out}")
        elif args.command == "sweep":
            _run_sweep(args)
        elif args.command == "eval":
            _run_eval(args)
    except (ValueError, SweepBusyError, *_USER_OS_ERRORS) as error:
        print(f"onelayer-fast: error: {_error_text(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
