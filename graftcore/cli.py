"""`graftcore merge ...`: flags from MergeOptions, one-line errors, exit codes 0 / 2 bad input / 130 interrupted /
141 reader gone."""

from __future__ import annotations

import argparse
import atexit
import difflib
import os
import re
import select
import signal
import sys
from dataclasses import MISSING

from graftcore import interrupts
from graftcore.errors import GraftError
from graftcore.options import option_fields
from graftcore.version import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2, like every other bad input; a mistyped
    option is named as such (with the closest real one), by the subcommand, before any missing required one
    (argparse alone says `--output` is required when `--ouput` was typed)."""

    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if self._subparsers is None and extras:  # a subcommand: its own unknown arguments, under its own name
            self.error(self.unrecognized(extras))
        return namespace, extras

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            typos = [a for a in self._argv if self.unknown_option(a)]
            message = self.unrecognized(typos) if typos else message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown_option(self, arg: str) -> bool:
        if not arg.startswith("-") or arg == "-" or NUMBER.fullmatch(arg):
            return False
        name = arg.split("=", 1)[0]
        return name not in self._option_string_actions and not any(
            o.startswith(name) for o in self._option_string_actions
        )

    def unrecognized(self, extras: list[str]) -> str:
        """'unrecognized argument(s) ...': the unknown options if any (their values left out), with the closest
        known option of each, else the stray values."""
        extras = [a for a in extras if a.startswith("-") and not NUMBER.fullmatch(a)] or extras
        words = []
        for arg in extras:
            close = difflib.get_close_matches(
                arg.split("=", 1)[0], [o for o in self._option_string_actions if o.startswith("--")], n=1
            )
            words.append(f"{arg} (did you mean {close[0]}?)" if close and arg.startswith("-") else arg)
        return f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(words)}"


NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")  # a negative value (--alpha -0.5), not an option


COMMANDS = {  # name: (help, description)
    "merge": (
        "write instruct + alpha * (tuned - base) (several --tuned: one term each)",
        "W_out = W_instruct + a1 * (W_tuned1 - W_base) + a2 * (W_tuned2 - W_base) + ..., tensor by tensor, "
        "float32 math, one rounding. REF is a folder, a .safetensors file, or a hub repo id org/name[@revision].",
    ),
    "similarity": (
        "how close Instruct is to Base, and each tuned model's update beside that gap",
        "Per tensor, layer, module kind and for the whole model: sigma = sum|I - B| / (sum|I| + sum|B|), "
        "||I - B|| / ||B||, cosine(I, B); with --tuned, the same for each T against B and ||T - B|| / ||I - B||. "
        "Reads the inputs as merge does; writes nothing but the report.",
    ),
    "verify": (
        "check that an output folder is what graftcore wrote",
        "Re-hash every shard against graftcore.json, check headers, the index and the planned tensors; "
        "with --recompute K, re-open the recorded inputs and compute K random chunks (and the first and last chunk "
        "of every shard) again, comparing bits. Exit 0 when all hold, 2 at the first discrepancy.",
    ),
}


def add_command(sub, name: str) -> argparse.ArgumentParser:
    """The subcommand `name`'s parser, with its help and description (COMMANDS)."""
    help_text, description = COMMANDS[name]
    return sub.add_parser(name, help=help_text, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="graftcore", description="Graft a fine-tune of a Base model onto its Instruct model.")
    parser.add_argument("--version", action="version", version=f"graftcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    merge = add_command(sub, "merge")
    merge.add_argument(
        "--base",
        metavar="REF",
        help="the Base model the tuned model was fine-tuned from "
        "(a LoRA adapter needs it only for modules_to_save or DoRA)",
    )
    merge.add_argument(
        "--tuned",
        metavar="REF",
        required=True,
        action="append",
        help="the fine-tuned Base model, or a PEFT LoRA adapter folder trained on Base; repeat it to merge several "
        "fine-tunes in one pass",
    )
    merge.add_argument("--instruct", metavar="REF", required=True, help="the Instruct model to graft onto")
    merge.add_argument("--output", metavar="DIR", required=True, help="the folder to write")
    add_option_flags(merge, [f.name for f in option_fields()])
    add_verify_parser(sub)
    add_similarity_parser(sub)
    return parser


def add_similarity_parser(sub) -> None:
    from graftcore.options import SIMILARITY_OPTIONS

    similarity = add_command(sub, "similarity")
    similarity.add_argument("--base", metavar="REF", required=True, help="the Base model")
    similarity.add_argument("--instruct", metavar="REF", required=True, help="the Instruct model")
    similarity.add_argument(
        "--tuned", metavar="REF", action="append", help="a fine-tune of Base or a PEFT LoRA adapter (repeatable)"
    )
    similarity.add_argument(
        "--output", metavar="DIR", help="write DIR/similarity.json (and DIR/similarity.png with matplotlib)"
    )
    add_option_flags(
        similarity,
        SIMILARITY_OPTIONS,
        {
            "graft only": "measure only",
            "copy tensors whose name matches REGEX from Instruct": "skip tensors whose name matches REGEX",
        },
    )


def add_option_flags(parser: argparse.ArgumentParser, names, reworded: dict[str, str] | None = None) -> None:
    """A flag for each MergeOptions field in `names`, from its declaration (help, type, choices, metavar);
    `reworded` replaces words in the help texts (another command's meaning of the same option)."""
    for f in option_fields():
        if f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta["help"]
        for old, new in (reworded or {}).items():
            help_text = help_text.replace(old, new)
        help_text = argparse.SUPPRESS if meta.get("hidden") else help_text
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name in ("include", "exclude"):
            parser.add_argument(flag, action="append", default=[], metavar=meta.get("metavar"), help=help_text)
        elif f.name == "alpha":  # repeatable; absent: the default
            parser.add_argument(flag, action="append", type=float, metavar=meta.get("metavar"), help=help_text)
        else:
            kind = meta.get("type") or {"float": float, "int": int}.get(str(f.type), str)
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                help=help_text,
            )


def add_verify_parser(sub) -> None:
    verify = add_command(sub, "verify")
    verify.add_argument("output", metavar="OUT", help="a folder written by graftcore merge")
    verify.add_argument(
        "--recompute", type=int, default=0, metavar="K", help="chunks to recompute from the inputs (default 0)"
    )
    verify.add_argument(
        "--seed", type=int, default=None, help="seed for the choice of chunks (default: random, printed)"
    )
    verify.add_argument("--token", default=None, help="Hugging Face token for hub inputs")
    verify.add_argument("--cache-dir", default=None, help="hub cache folder (default: $HF_HUB_CACHE)")


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The `graftcore` command: returns the exit code (0 done, 2 bad input or environment, 130 interrupted)."""
    # While inputs are resolved and planned (pure Python, network waits), a signal raises at once. torch loads
    # only after that, through interrupts.import_deferred(): meanwhile a signal only sets a flag (a
    # KeyboardInterrupt raised inside its C++ import code aborts the process). While data moves,
    # interrupts.deferred() turns it into a flag the engine checks between steps.
    for s in interrupts.SIGNALS:
        signal.signal(s, interrupts.request)
    args = None
    try:
        args = build_parser().parse_args(argv)
        for s in interrupts.SIGNALS:
            signal.signal(s, raise_interrupt)
        interrupts.check()  # a signal that came while the arguments were parsed
        code = run(args)
        if args.command == "merge":
            from graftcore.merge.distributed import shutdown

            shutdown()
    except KeyboardInterrupt:
        resume = (
            "; finished shards are kept, rerun the same command to resume"
            if getattr(args, "command", None) == "merge"
            else ""
        )
        print(f"graftcore: interrupted{resume}", file=sys.stderr)
        code = 130
    for s in interrupts.SIGNALS:  # from here on a signal only marks the exit as interrupted: no traceback
        signal.signal(s, interrupts.request)
    return 130 if interrupts.requested() else code


def entry() -> None:
    """The console script (and `python -m graftcore`): main(), then an exit no signal can turn into a crash.

    While the interpreter shuts down it puts the default handlers back, so a Ctrl-C then would kill the
    process by the signal (any thread may take it). Ignored signals are left ignored: main() ends with its
    flag-setting handlers, then the signals are ignored, and one that came before exits 130.

    A reader that goes away (`graftcore merge --dry-run ... | head -1`) ends the command quietly with the
    status a shell gives a command SIGPIPE killed (141), not a BrokenPipeError traceback.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse printed --help, --version or a usage error: flushed below
        code = e.code
    except BrokenPipeError as e:
        code = quiet_exit_on_closed_pipe(e)
    try:
        sys.stdout.flush()  # now, not at interpreter exit, where a closed pipe is reported as "Exception ignored"
    except BrokenPipeError as e:
        code = quiet_exit_on_closed_pipe(e)
    for s in interrupts.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    exit_now(130 if interrupts.requested() else code)


def exit_now(code) -> None:
    """Exit with `code` (as sys.exit takes it) once the atexit handlers have run (hub downloads cancelled, their
    temporary files removed) and output is flushed, without the interpreter's teardown of the modules: with
    torch loaded that took 0.35 s of every command's wall time on the development machine."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or sys.getprofile() or sys.gettrace():  # not CPython, or under a profiler or
        sys.exit(code)  # tracer that writes its results at the interpreter's own exit: the ordinary exit
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, or a stream closed: nothing left to deliver
            pass
    os._exit(code)


def closed_pipes() -> list[int]:
    """stdout and stderr where it is a pipe whose reader has gone (its write end polls POLLERR)."""
    poll = select.poll()
    for fd in (1, 2):
        poll.register(fd, select.POLLOUT)
    return [fd for fd, events in poll.poll(0) if events & (select.POLLERR | select.POLLHUP)]


def quiet_exit_on_closed_pipe(error: BrokenPipeError) -> int:
    """Point the closed stdout/stderr at /dev/null, so that the flush at exit cannot fail again, and return 141.
    Raises `error` when neither is closed (the broken pipe was another one: a bug to report, not to hide)."""
    gone = closed_pipes()
    if not gone:
        raise error
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in gone:
        os.dup2(devnull, fd)
    os.close(devnull)
    return 128 + signal.SIGPIPE


def run_verify(args: argparse.Namespace) -> int:
    from graftcore.analysis.verify import verify

    try:  # verify() checks its arguments, for the API and the CLI alike
        report = verify(args.output, args.recompute, args.seed, token=args.token, cache_dir=args.cache_dir)
    except GraftError as e:
        sys.stderr.write(f"graftcore: error: {e}\n")  # one write: ranks of a distributed merge share the stream
        return 2
    for note in report.notes:
        print(f"graftcore: {note}", file=sys.stderr)
    print(report.summary())
    return 0


def run_similarity(args: argparse.Namespace) -> int:
    from graftcore.analysis.similarity import similarity
    from graftcore.options import SIMILARITY_OPTIONS

    options = {k: v for k, v in vars(args).items() if k in SIMILARITY_OPTIONS and v is not None}

    def log(msg: str) -> None:
        print(f"graftcore: {msg}", file=sys.stderr)

    try:
        report = similarity(base=args.base, instruct=args.instruct, tuned=args.tuned, output=args.output, **options)
    except GraftError as e:
        print(f"graftcore: error: {e}", file=sys.stderr)
        return 2
    for note in report.notes:
        log(note)
    if report.skipped:
        log(report.not_measured())
    print(report.table())
    if report.json_path is not None:
        log(f"wrote {report.json_path}" + (f" and {report.png_path}" if report.png_path is not None else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        return run_verify(args)
    if args.command == "similarity":
        return run_similarity(args)
    from graftcore.api import graft

    option_names = {f.name for f in option_fields()}
    options = {k: v for k, v in vars(args).items() if k in option_names and v is not None}

    def log(msg: str) -> None:
        print(f"graftcore: {msg}", file=sys.stderr)

    try:
        report = graft(base=args.base, tuned=args.tuned, instruct=args.instruct, output=args.output, log=log, **options)
    except GraftError as e:
        sys.stderr.write(f"graftcore: error: {e}\n")  # one write: ranks of a distributed merge share the stream
        return 2
    if args.dry_run:
        print(report.plan.describe())
        return 0
    for note in report.notes:
        log(note)
    if report.ignored:
        log(
            f"{len(report.ignored)} tensor(s) in base/tuned but not in Instruct were ignored (listed in graftcore.json)"
        )
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    entry()
