"""The convention every `minlora` command follows, and the one place user errors become exit statuses.

A command module exposes

    add_arguments(parser)   its options
    run(args) -> int        does the work and returns the exit status

(a group of commands, like `minlora bench`, has only add_arguments, which adds its own
table of sub-commands with add_commands)
and is named in a table of `Command(module, help)`; the module is imported only when its
command is chosen, so `minlora --help` imports neither torch nor the compiled extension.

Options mean one thing everywhere: `--json` prints machine-readable JSON on stdout;
`--json-out FILE` writes it to FILE; `--plot FILE.png` writes a plot.

Exit statuses: 0 success, 1 an error (one line on stderr, no traceback), 2 bad usage,
3 a promotion refused by its gates, 4 corrupted stored weights.  MINLORA_TRACEBACK=1 shows
the traceback of an error instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, NoReturn, Optional

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArgumentParser",
    "Command",
    "CommandError",
    "DATABASE_ERROR",
    "EXIT_CORRUPT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "add_commands",
    "describe",
    "device_name",
    "exit_status",
    "is_instance",
    "non_negative_int",
    "output_file",
    "positive_int",
    "require_device",
    "run",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_CORRUPT = 0, 1, 2, 3, 4

# Exceptions of other layers and packages, by class path (importing them here would import
# those packages for every command), and the exit status each one means.  A subclass takes
# the status of its nearest listed base.
_EXIT_STATUS_BY_CLASS: dict[str, int] = {
    "minlora.registry.errors.PromotionRefusedError": EXIT_REFUSED,
    "minlora.registry.errors.CorruptBlobError": EXIT_CORRUPT,
    "minlora.registry.errors.DamagedDatabaseError": EXIT_CORRUPT,
    "minlora.registry.errors.RegistryError": EXIT_ERROR,
    "sqlalchemy.exc.DBAPIError": EXIT_ERROR,  # the database: unreachable, damaged, refused
    "sqlalchemy.exc.ArgumentError": EXIT_ERROR,  # a database URL that is not one
}
DATABASE_ERROR = "sqlalchemy.exc.DBAPIError"
# Built-in exceptions that a user's input or environment causes (a bad value, a missing or
# unwritable file, an invalid pattern in a config); anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, OSError, re.error)


class CommandError(Exception):
    """A user error a command reports as one line, with its exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Command(NamedTuple):
    """One entry of a command table: the module that implements it and its one-line help."""

    module: str
    help: str


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class _LazyCommands(argparse._SubParsersAction):
    """Sub-commands whose module is imported, and whose options are added, only when chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, tuple[argparse.ArgumentParser, str]] = {}

    def add_command(self, name: str, command: Command) -> None:
        parser = self.add_parser(name, help=command.help, description=command.help)
        self._pending[name] = (parser, command.module)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        pending = self._pending.pop(values[0], None)
        if pending is not None:
            chosen, module_name = pending
            module = importlib.import_module(module_name)
            module.add_arguments(chosen)
            chosen.set_defaults(_prog=chosen.prog)
            if hasattr(module, "run"):  # a group has none: one of its sub-commands is required
                chosen.set_defaults(_run=module.run)
        super().__call__(parser, namespace, values, option_string)


def add_commands(parser: argparse.ArgumentParser, commands: Mapping[str, Command], *, dest: str,
                 metavar: str = "COMMAND") -> None:
    """Adds `commands` (name -> Command) as sub-commands of `parser`, one of which is required."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=True, action=_LazyCommands)
    for name, command in commands.items():
        sub.add_command(name, command)


def _class_paths(exc: BaseException) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__]


def is_instance(exc: BaseException, class_path: str) -> bool:
    """isinstance(exc, the class named `class_path`), without importing its module."""
    return class_path in _class_paths(exc)


def exit_status(exc: BaseException) -> Optional[int]:
    """The exit status of a user error, or None when `exc` is a bug (it keeps its traceback)."""
    if isinstance(exc, CommandError):
        return exc.exit_code
    for path in _class_paths(exc):
        status = _EXIT_STATUS_BY_CLASS.get(path)
        if status is not None:
            return status
    return EXIT_ERROR if isinstance(exc, _USER_ERRORS) else None


def describe(exc: BaseException) -> str:
    """`exc`'s message on one line (a database error: the driver's own message, without the SQL)."""
    if is_instance(exc, DATABASE_ERROR):
        exc = getattr(exc, "orig", None) or exc
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, re.error):
        text = f"invalid regular expression {exc.pattern!r}: {text}"
    return text or type(exc).__name__


def run(args: argparse.Namespace) -> int:
    """Runs the chosen command; a user error becomes one line on stderr and its exit status."""
    prog = getattr(args, "_prog", "minlora")
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        status = exit_status(exc)
        if status is None or os.environ.get("MINLORA_TRACEBACK") == "1":
            raise
        print(f"{prog}: {describe(exc)}", file=sys.stderr)
        return status


# ---------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    """argparse type: 'cpu', 'cuda' or 'cuda:N' (whether it exists is checked by require_device)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)")
    return text


def require_device(name: str) -> "torch.device":
    """The torch device `name` names, or a CommandError when this machine does not have it."""
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: CUDA is not available here "
                               "(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise CommandError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def output_file(text: str) -> str:
    """argparse type: a file path that can be written (checked before any work is done).

    Missing parent folders are fine (they are created when the file is written) as long as
    the nearest existing one is a writable folder."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written (no permission to write in {parent})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written (no permission)")
    return text

