"""Start a recipe the way `trl sft` does: through `accelerate launch`, with launch flags mixed into the recipe's.

`trl-distill train --config x.yaml --max_steps 10 --num_processes 8` parses its arguments once here (so a bad YAML
key fails before any process starts), hands the recipe's fields to `python -m trl_distill.scripts.distill` and the
rest (`--num_processes`, `--config_file`, `--accelerate_config`, any other `accelerate launch` flag) to
`accelerate launch`, which reads the default `accelerate config` as usual. Inside a launched process (`accelerate launch
$(which trl-distill) train ...`, `torchrun`) the recipe runs in that process instead of launching again.
"""

from __future__ import annotations

import difflib
import importlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from . import Command


# set by `accelerate launch` (every launcher) or `torchrun` in the processes they start
LAUNCHED_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK")


def already_launched() -> bool:
    """Whether this process was started by `accelerate launch` or `torchrun` (then a recipe runs in it)."""
    return any(name in os.environ for name in LAUNCHED_ENV)


def _option_actions(parser) -> dict:
    return dict(parser._option_string_actions)  # argparse's map of every `--flag` to its action


def split_launch_args(argv: Sequence[str], script_parser) -> tuple[list[str], list[str]]:
    """Split `argv` into `(recipe_args, launch_args)`: the recipe's flags (and `--config`) win, `accelerate launch`
    flags (plus `--accelerate_config`) go to the launcher; any other flag is a `ValueError` naming the closest of both.
    A flag's values are the tokens up to the next `--flag` (for the launcher: as many as its action takes)."""
    from accelerate.commands.launch import launch_command_parser

    script = _option_actions(script_parser)
    launch = _option_actions(launch_command_parser())
    recipe_args, launch_args, target = [], [], None
    remaining = 0  # values still owed to the last launcher flag
    for token in argv:
        flag = token.split("=", 1)[0]
        if token.startswith("--") and (flag in script or flag == "--config"):
            target, remaining = recipe_args, -1
            recipe_args.append(token)
        elif token.startswith("-") and (flag in launch or flag == "--accelerate_config") and not _is_number(token):
            action = launch.get(flag)
            target = launch_args
            remaining = 1 if action is None else (0 if action.nargs == 0 else 1)
            remaining = 0 if "=" in token else remaining
            launch_args.append(token)
        elif token.startswith("--"):
            known = sorted({*script, *launch, "--config", "--accelerate_config"} - {"-h", "--help"})
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"command line: unknown flag `{flag}` ({token!r}).{hint} It is neither a field of this recipe nor an "
                "`accelerate launch` flag; `--help-all` lists the fields."
            )
        elif target is recipe_args or (target is launch_args and remaining != 0):
            target.append(token)
            remaining -= 1 if target is launch_args else 0
        else:
            raise ValueError(f"command line: unexpected value {token!r}; values follow their `--flag`.")
    return recipe_args, launch_args


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|FILE` -> `--config_file FILE`: a path, or a config shipped with TRL (`zero1`,
    `zero2`, `zero3`, `fsdp1`, `fsdp2`, `multi_gpu`, `single_gpu`), as `trl sft --accelerate_config` accepts."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("`--accelerate_config` needs a value: a file, or a TRL config name such as `zero3`.")
    value = launch_args[index + 1]
    path = Path(value)
    if not path.is_file():
        import importlib.resources

        configs = importlib.resources.files("trl").joinpath("accelerate_configs")
        shipped = configs.joinpath(f"{value}.yaml")
        if not shipped.is_file():
            names = sorted(p.name.removesuffix(".yaml") for p in configs.iterdir() if p.name.endswith(".yaml"))
            raise ValueError(
                f"`--accelerate_config {value}`: no such file, and not a config shipped with TRL ({names}). Give a "
                "path (e.g. recipes/accelerate_configs/ddp_cpu.yaml in a clone) or one of those names."
            )
        path = Path(str(shipped))
    return ["--config_file", str(path), *launch_args[:index], *launch_args[index + 2 :]]


def check_args(module, recipe_args: list[str]) -> None:
    """Parse `recipe_args` as the recipe will (YAML included), so a bad key or value fails before any launch."""
    if hasattr(module, "parse_args"):
        module.parse_args(recipe_args)
    else:
        from .stage import parse_args

        parse_args(module.make_parser(), recipe_args)


def run_command(command: Command, argv: Sequence[str], *, launch: bool = True) -> int:
    """Run `command` with `argv`: in this process when `launch` is false or a launcher started it, otherwise through
    `accelerate launch --module <command.module>`. Returns the exit code."""
    module = importlib.import_module(command.module)
    recipe_args, launch_args = split_launch_args(list(argv), module.make_parser())
    if not launch or already_launched():
        if launch_args:
            raise ValueError(
                f"`accelerate launch` flags {launch_args} given inside an already launched process; pass them to "
                "the launcher that started it."
            )
        result = module.main(recipe_args)
        return result if isinstance(result, int) else 0
    check_args(module, recipe_args)
    from accelerate.commands.launch import launch_command, launch_command_parser

    arguments = [*resolve_accelerate_config(launch_args), "--module", command.module, *recipe_args]
    try:
        launch_command(launch_command_parser().parse_args(arguments))
    except subprocess.CalledProcessError as error:  # the recipe failed; its traceback is already on stderr
        return error.returncode or 1
    return 0
