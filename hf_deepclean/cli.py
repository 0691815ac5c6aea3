"""`hf-deepclean` command line: `unlearn`, `fisher`, `evaluate`, `benchmark`, `push` and `demo`.

User errors (`DeepCleanError`) print one line on stderr and exit non-zero without a traceback; `--debug` shows it.

The same commands run under `torchrun` and `accelerate launch`: results, errors and logs are printed by the main
process only, and a finished multi-process run ends its process group before the interpreter exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .config import ARGUMENT_CLASSES, PRESETS, DeepCleanConfig, OutputArguments, preset_values
from .errors import DeepCleanError


COMMANDS = {
    "unlearn": "Make a model forget rows of its training data (DeepClean) and write the cleaned checkpoint.",
    "fisher": "Compute a model's Fisher sums over its training split once and save them, so that later deletion "
    "requests (`unlearn --fisher_cache`) cost one pass over the forget set.",
    "evaluate": "Measure how much a model remembers of the forget set, optionally against a retrained reference.",
    "benchmark": "Compare DeepClean with baselines and retraining on built-in scenarios (tables, JSON, plots).",
    "push": "Upload an output folder of `unlearn` to the Hub in one commit (also retries a failed --push_to_hub).",
    "demo": "Train a small digits classifier, unlearn one class from it and compare with retraining; or, with "
    "`--task causal-lm`, unlearn secrets memorised by a GPT-2's LoRA adapter (offline).",
}
PROG = "hf-deepclean"


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make trained Hugging Face models forget chosen training data (DeepClean, arXiv 2311.10448).",
        epilog=f"Run `{PROG} COMMAND --help` for the arguments of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of errors.")


# argparse's own wording for a value of the wrong type or outside the choices, and what each flag accepts then
_ARGPARSE_INVALID = re.compile(
    r"^argument (?P<flag>[^:]+): invalid (?P<kind>\w+)(?: value)?: (?P<value>'.*?')(?P<rest>.*)$"
)
_ACCEPTED_TYPES = {"float": "a number", "int": "an integer", "string_to_bool": "true or false"}


class _ArgumentParser(HfArgumentParser):
    """Usage errors become `DeepCleanError`s, so they print as one line like every other bad input, in the same
    `--flag: got VALUE; expected ...` form."""

    def error(self, message: str):
        match = _ARGPARSE_INVALID.match(message)
        if match is None:
            raise DeepCleanError(message)
        flag, kind, value = match.group("flag").split("/")[0], match.group("kind"), match.group("value")
        if kind == "choice":
            accepted = "one of " + match.group("rest").strip(" ()").removeprefix("choose from ")
        else:
            accepted = _ACCEPTED_TYPES.get(kind, f"a {kind} value")
        raise DeepCleanError(f"{flag}: got {value}; expected {accepted}.")


def dataclass_parser(command: str = "unlearn", dataclass_types=None) -> HfArgumentParser:
    """The parser of a command whose arguments are dataclasses (default: those of `unlearn`, or of `fisher`), plus
    `--config` and `--debug`."""
    if dataclass_types is None and command == "fisher":
        from .pipeline.fisher_sums import FISHER_ARGUMENT_CLASSES as dataclass_types
    elif dataclass_types is None:
        dataclass_types = ARGUMENT_CLASSES
    parser = _ArgumentParser(dataclass_types, prog=f"{PROG} {command}", description=COMMANDS[command])
    for action in parser._actions:
        # `bool | None` fields (None: decided by the run) take a bare flag as `true`, like plain `bool` fields;
        # HfArgumentParser gives them a required value
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of argument values; they act as defaults that command-line flags override.",
    )
    if DeepCleanConfig in dataclass_types:
        parser.add_argument(
            "--preset",
            default=None,
            choices=list(PRESETS),
            help="Named DeepClean settings: `default`; `paper` (zero reset above a ratio threshold, as in arXiv "
            "2311.10448); `finetuned` (for a fine-tuned pretrained model: --reset base, which needs "
            "--base_model_name_or_path, and a repair that stops once retain accuracy is back). The preset's values "
            "act as defaults under --config and the command-line flags.",
        )
    _add_common_flags(parser)
    return parser


def _load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DeepCleanError(f"--config: could not read {path!r}: {type(error).__name__}.") from None
    if not isinstance(values, dict):
        raise DeepCleanError(f"--config: {path!r} must hold a mapping of argument names to values.")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(str(key) for key in values if key not in actions or key == "config")
    if unknown:
        raise DeepCleanError(f"--config: {path!r} has unknown keys {unknown}.")
    for key, value in values.items():
        if actions[key].nargs in ("+", "*") and isinstance(value, str):
            values[key] = [value]  # `data_files: a.csv` means a one-element list, as on the command line
    return values


def parse_unlearn_args(argv: Sequence[str], command: str = "unlearn", dataclass_types=None):
    """Parse a command's arguments: `--config FILE` values first, then command-line flags on top.

    Returns:
        One instance per dataclass type (for `unlearn`: `(model_args, data_args, deepclean_config,
        output_args)`), then `debug`.
    """
    parser = dataclass_parser(command, dataclass_types)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = _load_yaml_defaults(known.config, parser) if known.config else {}
    preset = known.preset or defaults.get("preset")
    if preset is not None and any(action.dest == "preset" for action in parser._actions):
        # lowest precedence: the preset, then the file, then the flags
        defaults = {**preset_values(preset), **defaults}
    for action in parser._actions:
        if action.dest in defaults:
            # a value from the file satisfies a required argument; the flag can still override it
            action.required = False
    parser.set_defaults(**defaults)
    *arguments, namespace, remaining = parser.parse_args_into_dataclasses(
        args=list(argv), return_remaining_strings=True
    )
    if remaining:
        raise DeepCleanError(f"unrecognized arguments: {' '.join(remaining)}; see `{PROG} {command} --help`.")
    return (*arguments, namespace.debug)


def run_unlearn(argv: Sequence[str]) -> int:
    from .pipeline.unlearn import unlearn

    model_args, data_args, method, output_args, _ = parse_unlearn_args(argv)
    results = unlearn(method, model_args, data_args, output_args).results
    if _is_main_process():
        print(json.dumps({"before": results.metrics_before, "after": results.metrics_after}, indent=2))
        print(f"Cleaned model written to {output_args.output_dir}")
        if results.hub_commit_url is not None:
            print(f"Pushed to the Hub: {results.hub_commit_url}")
    return 0


HUB_FIELDS = ("hub_model_id", "hub_private_repo", "hub_revision")


def push_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=f"{PROG} push", description=COMMANDS["push"])
    parser.add_argument("output_dir", help="Output folder written by `hf-deepclean unlearn`.")
    hub_fields = {f.name: f for f in dataclasses.fields(OutputArguments) if f.name in HUB_FIELDS}
    for name in HUB_FIELDS:
        field = hub_fields[name]
        kwargs = {"type": string_to_bool, "metavar": "{true,false}"} if field.type in (bool, "bool") else {}
        parser.add_argument(
            f"--{name}", default=field.default, required=name == "hub_model_id", help=field.metadata["help"], **kwargs
        )
    _add_common_flags(parser)
    return parser


def run_push(argv: Sequence[str]) -> int:
    from .hub.push import push_output_dir

    namespace = push_parser().parse_args(list(argv))
    output_args = OutputArguments(
        namespace.output_dir, push_to_hub=True, **{name: getattr(namespace, name) for name in HUB_FIELDS}
    )
    commit = push_output_dir(
        output_args.output_dir,
        output_args.hub_model_id,
        private=output_args.hub_private_repo,
        revision=output_args.hub_revision,
    )
    print(f"Pushed to the Hub: {commit.commit_url}")
    return 0


def run_fisher(argv: Sequence[str]) -> int:
    from .pipeline.fisher_sums import compute_fisher_sums

    model_args, data_args, method, fisher_args, _ = parse_unlearn_args(argv, "fisher")
    result = compute_fisher_sums(method, model_args, data_args, fisher_args)
    if _is_main_process():
        print(
            f"Fisher sums over {result.info.count} rows of split {result.info.split!r} ({result.seconds:.1f} s) "
            f"written to {fisher_args.fisher_output}"
        )
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench.demo import DEFAULT_FORGET

    parser.add_argument(
        "--task",
        default="image-classification",
        choices=("image-classification", "causal-lm"),
        help="`image-classification`: forget a digit class from a ViT; `causal-lm`: forget notes with secret PINs "
        "from a GPT-2's LoRA adapter (--forget and --epochs do not apply). Default: %(default)s.",
    )
    parser.add_argument("--output_dir", default="demo_output", help="Folder for the cleaned model.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace an existing --output_dir.")
    # no defaults here, so that a value given with `--task causal-lm` (where they do not apply) can be refused
    parser.add_argument("--forget", default=None, help=f"Forget specification (default: {DEFAULT_FORGET}).")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs of original and reference (40).")
    parser.add_argument("--work_dir", default=".deepclean_demo", help="Scratch folder for the trained model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data split, initialisation and training.")


def run_demo(argv: Sequence[str]) -> int:
    from .bench.demo import DEFAULT_FORGET, format_demo_table
    from .bench.demo import run_demo as run_digits_demo

    parser = argparse.ArgumentParser(prog=f"{PROG} demo", description=COMMANDS["demo"])
    _add_demo_arguments(parser)
    _add_common_flags(parser)
    args = parser.parse_args(list(argv))
    common = {"work_dir": args.work_dir, "overwrite_output_dir": args.overwrite_output_dir, "seed": args.seed}
    if args.task == "causal-lm":
        from .bench.causal_lm_demo import format_causal_lm_table, run_causal_lm_demo

        for flag in ("forget", "epochs"):
            if getattr(args, flag) is not None:
                raise DeepCleanError(
                    f"--{flag}: does not apply to --task causal-lm; expected it only with image-classification."
                )

        result = run_causal_lm_demo(args.output_dir, **common)
        table = format_causal_lm_table(result)
    else:
        forget = DEFAULT_FORGET if args.forget is None else args.forget
        result = run_digits_demo(
            args.output_dir, forget=forget, epochs=40 if args.epochs is None else args.epochs, **common
        )
        table = format_demo_table(result)
    print(table)
    print(f"Cleaned model written to {result.output_dir}")
    return 0


def run_evaluate(argv: Sequence[str]) -> int:
    from .config import DataArguments, ModelArguments
    from .pipeline.assessment import EvaluationArguments, evaluate_forgetting
    from .records import to_json

    model_args, data_args, eval_args, _ = parse_unlearn_args(
        argv, "evaluate", (ModelArguments, DataArguments, EvaluationArguments)
    )
    results = evaluate_forgetting(model_args, data_args, eval_args)
    if not _is_main_process():
        return 0
    text = to_json(results)
    print(text, end="")
    if eval_args.output_file:
        with open(eval_args.output_file, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


def run_benchmark(argv: Sequence[str]) -> int:
    from .bench.baselines import BaselineConfig
    from .bench.benchmark import BenchmarkArguments, benchmark_main
    from .bench.report import format_benchmark_tables
    from .config import DeepCleanConfig

    args, method, baselines, _ = parse_unlearn_args(
        argv, "benchmark", (BenchmarkArguments, DeepCleanConfig, BaselineConfig)
    )
    results = benchmark_main(args, method, baselines)
    if not _is_main_process():
        return 0
    print(format_benchmark_tables(results), end="")
    print(f"Benchmark report written to {args.output_dir}")
    return 0


RUNNERS = {
    "unlearn": run_unlearn,
    "fisher": run_fisher,
    "evaluate": run_evaluate,
    "benchmark": run_benchmark,
    "push": run_push,
    "demo": run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in RUNNERS:
        parser = _top_level_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}")
        parser.parse_args(argv)
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    debug = "--debug" in rest
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    level = logging.DEBUG if debug else logging.INFO
    logging.getLogger("hf_deepclean").setLevel(level if _is_main_process() else logging.ERROR)
    if _launch_rank("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK") != 0:
        from .distributed import quiet_other_processes

        quiet_other_processes()
    # Errors come from the arguments and the data, which every process shares, so every process meets them and
    # only the main one prints them; a failure of one process alone ends the launch (the launcher stops the rest).
    try:
        with _terminate_as_interrupt():
            status = RUNNERS[command](rest)
    except DeepCleanError as error:
        if debug:
            raise
        if _is_main_process():
            print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except _Interrupted as interrupt:
        # the `finally` blocks on the way out removed temporary folders and files; nothing partial is left
        if _is_main_process():
            print(f"{PROG} {command}: interrupted by {interrupt.name}; nothing was written.", file=sys.stderr)
        return 128 + interrupt.signum
    if "torch" in sys.modules:  # a process group exists only once torch is imported
        from .distributed import end_processes

        end_processes()
    return status


def _launch_rank(*names: str) -> int:
    """A rank that the launcher (`torchrun`, `accelerate launch`, MPI) put in the environment; 0 without one. Read
    from the environment so that light commands (`push`, `--help`) need not import torch."""
    return max(int(os.environ.get(name) or 0) for name in names)


def _is_main_process() -> bool:
    """Whether this process prints results, errors and logs: the first one of a multi-process launch."""
    return _launch_rank("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK") == 0


class _Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is, so that cleanup runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `_Interrupted` for the duration of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


if __name__ == "__main__":
    sys.exit(main())
