"""`graftcore merge ...`: flags from MergeOptions, one-line errors, exit codes 0 / 2 bad input / 130 interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import MISSING

from . import __version__, interrupts
from .errors import GraftError
from .options import option_fields


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="graftcore", description="Graft a fine-tune of a Base model onto its Instruct model.")
    parser.add_argument("--version", action="version", version=f"graftcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    merge = sub.add_parser(
        "merge",
        help="write instruct + alpha * (tuned - base)",
        description="W_out = W_instruct + alpha * (W_tuned - W_base), tensor by tensor. REF is a folder, a "
        ".safetensors file, or a hub repo id org/name[@revision].",
    )
    merge.add_argument(
        "--base", metavar="REF", help="the Base model the tuned model was fine-tuned from (a LoRA adapter needs it only for modules_to_save or DoRA)"
    )
    merge.add_argument(
        "--tuned", metavar="REF", required=True, help="the fine-tuned Base model, or a PEFT LoRA adapter folder trained on Base"
    )
    merge.add_argument("--instruct", metavar="REF", required=True, help="the Instruct model to graft onto")
    merge.add_argument("--output", metavar="DIR", required=True, help="the folder to write")
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = argparse.SUPPRESS if meta.get("hidden") else meta["help"]
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.type in ("bool", bool):
            merge.add_argument(flag, action="store_true", help=help_text)
        elif f.name in ("include", "exclude"):
            merge.add_argument(flag, action="append", default=[], metavar=meta.get("metavar"), help=help_text)
        else:
            kind = meta.get("type") or {"float": float, "int": int}.get(str(f.type), str)
            merge.add_argument(
                flag, type=kind, default=default, choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text
            )
    return parser


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The `graftcore` command: returns the exit code (0 done, 2 bad input or environment, 130 interrupted)."""
    # Outside the engine a signal raises KeyboardInterrupt at once (nothing is shared with a thread yet);
    # while data moves, interrupts.deferred() turns it into a flag the engine checks between steps.
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("graftcore: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        code = 130
    # From here on (interpreter shutdown), a signal only marks the exit as interrupted: no traceback.
    for s in interrupts.SIGNALS:
        signal.signal(s, interrupts.request)
    return 130 if interrupts.requested() else code


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from .api import graft

    option_names = {f.name for f in option_fields()}
    options = {k: v for k, v in vars(args).items() if k in option_names}

    def log(msg: str) -> None:
        print(f"graftcore: {msg}", file=sys.stderr)

    try:
        report = graft(base=args.base, tuned=args.tuned, instruct=args.instruct, output=args.output, log=log, **options)
    except GraftError as e:
        print(f"graftcore: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(report.plan.describe())
        return 0
    for note in report.notes:
        log(note)
    if report.ignored:
        log(f"{len(report.ignored)} tensor(s) in base/tuned but not in Instruct were ignored (listed in graftcore.json)")
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
