"""What every command shares: the Typer app, the console, one-line errors, progress, safe printing."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cfdeploy.backends import BACKENDS
from cfdeploy.errors import (  # noqa: F401
    COMMAND_EXTRAS,
    EXTRAS,
    CfdeployError,
    missing_extra,
    require_finite,
    require_range,
)


class OneLineUsageErrors(typer.core.TyperGroup):
    """The command line's own refusals (an unknown option or command, a value of the wrong type, a missing option)
    as one ``error:`` line (naming the command where Click knows it), exit 2, as every other refusal; Click would
    print a usage block and Typer a framed panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.Abort:
            sys.exit(fail("aborted", 1).exit_code)
        except Exception as raised:
            if not is_click_refusal(raised):
                raise
            error: Any = raised  # Click's exception: its class is Typer's private copy of Click's
            if type(error).__name__ == "NoArgsIsHelpError":  # the help has been printed in its place
                sys.exit(error.exit_code)
            sys.exit(fail(usage_error_line(error), error.exit_code).exit_code)
        sys.exit(code if isinstance(code, int) else 0)  # an exit code (commands return None)


def is_click_refusal(error: Any) -> bool:
    """Whether ``error`` is Click's ``ClickException`` (Typer keeps its own copy of Click, not importable as such)."""
    return any(kind.__name__ == "ClickException" for kind in type(error).__mro__)


def usage_error_line(error: Any) -> str:
    """``cfdeploy edit: no such option: --bogus; see cfdeploy edit --help`` from Click's message."""
    message = " ".join(error.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    context = getattr(error, "ctx", None)
    if context is None:
        return message
    return f"{context.command_path}: {message}; see {context.command_path} --help"


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Deploy CF-CLIP text-driven StyleGAN2 editors: edit images from text, export bundles and TensorRT engines, "
    "benchmark backends, inspect files.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True, highlight=False)


def flowed(text: str) -> str:
    """``text`` with each paragraph on one line. Typer keeps a docstring's line breaks after its first paragraph, so
    a docstring wrapped for the source would break mid-sentence in a terminal; a flowing paragraph Rich wraps."""
    return "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in text.split("\n\n"))


def flow_help(typer_app: typer.Typer) -> None:
    """Every command's help in ``typer_app`` and its groups as flowing paragraphs (:func:`flowed`)."""
    for command in typer_app.registered_commands:
        command.help = flowed(command.help or inspect.getdoc(command.callback) or "")
    for group in typer_app.registered_groups:
        assert group.typer_instance is not None
        flow_help(group.typer_instance)


def show_version(asked: bool) -> None:
    if asked:
        from cfdeploy.environment import package_version, runtimes

        typer.echo(f"cfdeploy {package_version('cfdeploy')}")
        for package, version in runtimes().items():
            typer.echo(f"  {package} {version}")
        raise typer.Exit()


@app.callback()
def cfdeploy_options(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=show_version,
        help="Print cfdeploy's version and the runtimes installed, then exit.",
    ),
) -> None:
    """Deploy CF-CLIP text-driven StyleGAN2 editors (and DAC on Stable Diffusion)."""


# One precision vocabulary for every command: the registry's, in its order (each backend takes the subset it lists).
PRECISIONS = tuple(dict.fromkeys(precision for info in BACKENDS.values() for precision in info.precisions))
Precision = Enum("Precision", [(name, name) for name in PRECISIONS], type=str)  # type: ignore[misc]
# --precision's metavar: Typer's "[fp32|fp16|bf16|mixed]" is split mid-word in an 80-column terminal.
PRECISION_CHOICES = "|".join(PRECISIONS)
Command = TypeVar("Command", bound=Callable[..., Any])
COMMAND_GROUPS = {"cfdeploy.cli.dac": "dac"}  # a command group's module: the group's name
# C0 and C1 control characters (ESC starts terminal escape sequences and OSC 8 links), DEL, and the
# bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """Text from files or users, safe for a terminal: control characters shown as ``\\xNN``, not obeyed."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", str(text))


def safe(text: object) -> str:
    """:func:`plain`, and escaped for Rich markup, for interpolating into a markup string."""
    return escape(plain(text))


def say(message: str) -> None:
    """Print a status line built from user or file text (no markup is interpreted)."""
    console.print(plain(message), markup=False, soft_wrap=True)


def reporter(status: Any) -> Callable[[str], None]:
    """A callback for long library work: each message updates the spinner and is kept as a line."""

    def report(message: str) -> None:
        status.update(safe(message))
        say(message)

    return report


def retired(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of an option given under its old, hidden name (with a warning naming the new one), or of the new.

    Old spellings keep working so scripts do not break, but the CLI has one name per concept (docs/cli.md).
    """
    if old_value in (None, [], False):
        return new_value
    if new_value not in (None, [], False):
        raise CfdeployError(f"{old} is the old name of {new}: give {new} only")
    warn(f"{old} is now {new}; the old name will be removed")
    return old_value


# The artifact a command runs is named by an option (--bundle, --run, --checkpoint). The positional argument it once
# was still works, with a warning: such commands take extra arguments (kept out of their usage line) and read them here.
POSITIONAL_ARTIFACT = {"allow_extra_args": True}


def positional(context: typer.Context) -> list[Path]:
    """The retired positional arguments a command was given (``serve`` takes several)."""
    return [Path(argument) for argument in context.args]


def one_positional(context: typer.Context) -> Path | None:
    """The retired positional argument of a command that names one artifact, if given."""
    given = positional(context)
    if len(given) > 1:
        raise CfdeployError(f"unexpected arguments {' '.join(plain(argument)[:60] for argument in context.args)}")
    return given[0] if given else None


def artifact(option: str, given: Path | None, context: typer.Context) -> Path:
    """The artifact named by ``option``, or by the retired positional argument; one of them is required."""
    name = option.removeprefix("--").upper()
    found: Path | None = retired(f"a positional {name}", one_positional(context), option, given)
    if found is None:
        raise CfdeployError(f"give {option} {name}")
    return found


def no_session_cache_option(panel: str | None = None) -> Any:
    """``--no-session-cache``, the same option in every command that opens a bundle backend."""
    return typer.Option(
        False,
        "--no-session-cache",
        rich_help_panel=panel,
        help="Bundles on ONNX Runtime or OpenVINO: neither read nor fill the per-user cache of compiled graphs "
        "(~/.cache/cfdeploy, or $CFDEPLOY_CACHE_DIR) that lets a fresh process skip compiling them, nor its record of "
        "files hashed before: every file is hashed.",
    )


def threads_option(panel: str | None = None) -> Any:
    return typer.Option(
        None,
        "--threads",
        metavar="N",
        rich_help_panel=panel,
        help="onnxruntime and openvino backends: inference threads. \\[default: the physical cores]",
    )


def session_cache_option(no_session_cache: bool) -> bool | None:
    """The backends' ``session_cache`` option from ``--no-session-cache`` (None: the backend's default, on)."""
    return False if no_session_cache else None


def require_files(*paths: Path | None) -> None:
    """Every input file given is there and regular, checked before anything slow loads: a typo in the last option
    should not cost the minute the models take to load."""
    from cfdeploy.files import require_file

    for path in paths:
        if path is not None:
            require_file(path)


def precision_among(precision: Any, allowed: tuple[str, ...], where: str) -> str | None:
    """``--precision``'s value if ``where`` offers it, else one line naming what it offers."""
    if precision is None:
        return None
    value = str(precision.value)
    if value not in allowed:
        raise CfdeployError(f"--precision {value}: {where} offers {', '.join(allowed)}")
    return value


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {safe(message)}", soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {safe(message)}", soft_wrap=True)
    return typer.Exit(code)


def user_errors(command: Command) -> Command:
    """Library errors and missing extras become one line on stderr and exit 2; anything else exit 1, no traceback.

    Libraries' warnings (PyTorch's, Ray's) are held until the command ends: shown after a success, dropped with an
    error, so a refusal is one line."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as held:
            outcome = _one_line_errors(command, *args, **kwargs)
        for caught in held:
            warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
        return outcome

    return wrapper  # type: ignore[return-value]


def _one_line_errors(command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``command``; each kind of failure becomes one line and its exit code."""
    try:
        return command(*args, **kwargs)
    except typer.Exit:  # a command that said why itself, with its own exit code
        raise
    except CfdeployError as error:
        raise fail(str(error)) from None
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRAS and package != "tensorrt":
            raise
        group = COMMAND_GROUPS.get(command.__module__)
        name = " ".join(filter(None, (group, command.__name__.removesuffix("_command").replace("_", "-"))))
        raise fail(str(missing_extra(package, f"cfdeploy {name}", error, extra=COMMAND_EXTRAS.get(name)))) from None
    except KeyboardInterrupt as error:  # a command that kept something says what, in the interrupt's message
        raise fail(f"interrupted; {str(error) or 'nothing was written'}", code=130) from None
    except MemoryError:
        raise fail("out of memory (an input declares more data than this machine holds?)") from None
    except Exception as error:
        if os.environ.get("CFDEPLOY_DEBUG"):
            raise
        raise fail(f"unexpected {type(error).__name__}: {error} (set CFDEPLOY_DEBUG=1 for a traceback)", 1) from None


@contextlib.contextmanager
def resumable(save: Path) -> Iterator[None]:
    """Ctrl-C in a run that keeps ``save`` says how to continue it, instead of claiming nothing was written."""
    try:
        yield
    except KeyboardInterrupt:
        if save.is_file():
            raise KeyboardInterrupt(
                f"{save} keeps the last save: continue with the same command and --resume"
            ) from None
        raise


class PhaseLines:
    """:func:`phase` outside a terminal: a line when the phase ends, with its time, so logs show where a command
    went. A phase that fails prints nothing of its own: the error is the one line."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.started = time.monotonic()

    def __enter__(self) -> PhaseLines:
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc_info: object) -> None:
        if failure is None:
            console.print(f"{self.message} ({time.monotonic() - self.started:.1f} s)", soft_wrap=True)

    def update(self, message: str) -> None:
        """Spinner text in a terminal; a log has the phase's line at its end."""


def phase(message: str) -> Any:
    """A spinner with ``message`` in a terminal; in a log, the message and its time as a line when it is done."""
    return console.status(message) if console.is_terminal else PhaseLines(message)


@dataclasses.dataclass
class LineTask:
    description: str
    total: float | None
    completed: float = 0
    stage: str | None = None
    stage_started: float = 0.0
    printed_at: float | None = None
    printed_step: float = -1


class ProgressLines:
    """:func:`progress_bar` outside a terminal (logs, CI, ``nohup``), where Rich's bar shows nothing: a line for each
    stage (a description set without progress) when it ends, with its time; then a line per twentieth of the work,
    and at least one a minute while work goes on. A stage that fails prints nothing of its own."""

    LINES_PER_TASK = 20
    QUIET_S = 60.0

    def __init__(self) -> None:
        self.tasks: list[LineTask] = []

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc_info: object) -> None:
        if failure is None:
            for task in self.tasks:
                self.end_stage(task)
                if task.completed > max(task.printed_step, 0):
                    self.print_progress(task)

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append(LineTask(description, total))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        moved = completed is not None or advance is not None
        if not moved:
            if description is not None and description != task.stage:
                self.end_stage(task)
                task.description = task.stage = description
                task.stage_started = time.monotonic()
            return
        self.end_stage(task)
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        if task.completed < task.printed_step:  # a phase that counts from zero again
            task.printed_at, task.printed_step = None, -1
        if description is not None:
            task.description = description
        if self.due(task):
            self.print_progress(task)

    def end_stage(self, task: LineTask) -> None:
        if task.stage is not None:
            console.print(f"{task.stage} ({time.monotonic() - task.stage_started:.1f} s)", soft_wrap=True)
            task.stage = None

    def print_progress(self, task: LineTask) -> None:
        of = f"/{task.total:g}" if task.total else ""
        console.print(f"{task.description} [{task.completed:g}{of}]", markup=False, soft_wrap=True)
        task.printed_at, task.printed_step = time.monotonic(), task.completed

    def due(self, task: LineTask) -> bool:
        if task.completed <= task.printed_step:
            return False
        if task.printed_at is None or time.monotonic() - task.printed_at >= self.QUIET_S:
            return True
        if not task.total:
            return False
        every = max(1.0, math.ceil(task.total / self.LINES_PER_TASK))
        return task.completed >= task.total or task.completed // every > max(task.printed_step, 0) // every


def progress_bar() -> Any:
    """Rich's bar in a terminal; :class:`ProgressLines` elsewhere."""
    if not console.is_terminal:
        return ProgressLines()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
