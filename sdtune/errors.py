"""Errors that the CLI turns into one line on stderr and a meaningful exit code; PIL's own warnings kept quiet where
sdtune names the file itself."""

import os
import re
import shlex
import sys
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator


class SdtuneError(Exception):
    """A problem the user can fix (bad input, missing model, wrong adapter): exit code 2."""

    exit_code = 2

    def __init__(self, *args):
        # A DataLoader worker's error is raised again in the loop as its type, its message the worker's whole
        # traceback ("Caught SdtuneError in DataLoader worker process 0. Original Traceback ..."): keep its own.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and "\nOriginal Traceback" in args[0]:
            args = (_raised_message(args[0], type(self)),)
        super().__init__(*args)


def _raised_message(traceback: str, kind: type) -> str:
    """The message of the `kind` error a printed traceback ends with."""
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    if marker in traceback:
        return traceback.rsplit(marker, 1)[1].strip()
    return traceback.strip().splitlines()[-1]


class TrainingFailed(SdtuneError):
    """Training started but could not go on (for example a non-finite loss): exit code 1."""

    exit_code = 1


class SweepFailed(SdtuneError):
    """A sweep went through its runs but some failed (each recorded in its folder): exit code 1."""

    exit_code = 1


@contextmanager
def reading_file(path, what: str, folder_hint: str):
    """A file of the user's read inside this block fails as one line naming it: missing, a folder (with
    `folder_hint`, what to give instead) or unreadable. `what` names the kind of file ("prompt file")."""
    try:
        yield
    except FileNotFoundError:
        raise SdtuneError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SdtuneError(f"{what} {path} is a folder; {folder_hint}") from None
    except OSError as error:
        raise SdtuneError(f"{what} {path} cannot be read: {error.strerror or error}") from None


def first_sentence(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an error's message on one line, cut at a word (with an ellipsis) when
    longer than `limit`: what a one-line message can quote of another library's error."""
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " …"
    return sentence


def error_line(error: BaseException) -> str:
    """One line for a failure: an SdtuneError's own message, else the error's type and first sentence."""
    if isinstance(error, SdtuneError):
        return str(error)
    return f"{type(error).__name__}: {first_sentence(error, 300)}" if str(error).strip() else type(error).__name__


# what a shell would split or expand in a word: a value holding any is quoted in a message, to be read back whole
SHELL_SPECIAL = re.compile(r"[\s'\"\\$`;&|<>()*?\[\]#!{}]")


def shell_word(value) -> str:
    """`value` as a message gives it after its flag, to be typed back or read as one value (`config.python_spelled`):
    as it is, or shell-quoted where it holds a space or a character a shell reads (`--output 'my runs/x'`)."""
    text = str(value)
    return shlex.quote(text) if not text or SHELL_SPECIAL.search(text) else text


# How the sdtune call in progress names settings in what it says (errors, warnings): a Python call's command
# (`config.python_spelling`), whose settings it names as Python spells them (`overwrite=True`); AS_TYPED where the
# CLI answers (flags, as the user typed them); None before a call decides (the next sdtune call is the user's own).
AS_TYPED = ""
settings_spelled_for: ContextVar[str | None] = ContextVar("sdtune_settings_spelled_for", default=None)
# `config.python_spelled(message, command)`, set as config is imported: config imports this module, not this it
respell: Callable[[str, str], str] | None = None


def said_to_caller(message: str) -> str:
    """`message` as the call in progress says it: settings as Python spells them inside a Python call, else as written."""
    command = settings_spelled_for.get()
    return respell(message, command) if command and respell is not None else message


PACKAGE_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` at the line that called into sdtune (a notebook's cell, a script's `sdtune.train(...)`), not at
    sdtune's own: the caller of the outermost sdtune frame on the stack, however deep the warning is raised (through
    contextlib, torch's data loader, ...). `stacklevel` counts frames, and `skip_file_prefixes` needs Python 3.12.
    Raised to Python code, its settings are named as Python spells them (`said_to_caller`); the CLI's name flags."""
    message = said_to_caller(message)
    frame, caller = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_FOLDER):
            caller = frame.f_back
        frame = frame.f_back
    if caller is None:  # called into from no code of its own (a worker's loop in the package alone)
        caller = sys._getframe(1)
    where = caller.f_globals
    # no module_globals, as warnings.warn passes none: with them, the source line is asked of the module's loader,
    # which raises for code run by `python -c` (__main__'s loader is the built-in importer); linecache reads files
    warnings.warn_explicit(message, category, caller.f_code.co_filename, caller.f_lineno, where.get("__name__", "<string>"),
                           where.setdefault("__warningregistry__", {}))


@contextmanager
def quiet_pil() -> Iterator[None]:
    """A block in which PIL's own warnings (corrupt EXIF data, ...) are not shown: they name no file, and would
    come again each time a header is read; data.readable_images names them once, with their file. On a thread that
    records its warnings (`recording`), the filter `warnings_per_thread` set once for every thread holds instead:
    `catch_warnings` swaps the process's one list of filters, which other threads read meanwhile."""
    if recorded_warnings() is not None:
        yield
        return
    with warnings.catch_warnings():
        _quiet_pil_filter()
        yield


def _quiet_pil_filter() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


# Images decoded on threads (data.load_framed_images) warn in the order of the files, as one thread decoding them
# would: each thread records what it would warn, and the main thread raises it again, file by file.
_THREAD = threading.local()  # .said: the warnings recorded on this thread, in order; None where it does not record


def recorded_warnings() -> list | None:
    """The list the warnings raised on this thread go to (`recording`), or None where they are shown."""
    return getattr(_THREAD, "said", None)


@contextmanager
def warnings_per_thread() -> Iterator[None]:
    """A block, entered by the main thread while others work for it, in which the warnings raised on a thread inside
    its `recording` block go to its record, every one (no "once per place": which thread came first is chance), PIL's
    own UserWarnings left out as `quiet_pil` leaves them out; other threads' are shown, every one too. The filters
    are set here once, for every thread; they are the main thread's again after the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _quiet_pil_filter()
        show = warnings.showwarning

        def routed(message, category, filename, lineno, file=None, line=None):
            said = recorded_warnings()
            if said is None:
                show(message, category, filename, lineno, file, line)
            else:
                said.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

        warnings.showwarning = routed
        yield


@contextmanager
def recording() -> Iterator[list]:
    """A block whose warnings on this thread are kept in the list it gives, in order, inside `warnings_per_thread`,
    to be raised again by `warn_again`."""
    _THREAD.said = said = []
    try:
        yield said
    finally:
        _THREAD.said = None


def warn_again(said: list) -> None:
    """Raise recorded warnings (`recording`) again, in order, as raised where they were: by the filters and the
    once-per-place registry of the module at their file."""
    modules = None
    for warning in said:
        if modules is None:  # a module's registry, found by its file
            modules = {getattr(module, "__file__", None): module for module in list(sys.modules.values())}
        module = modules.get(warning.filename)
        name = module.__name__ if module is not None else None
        registry = vars(module).setdefault("__warningregistry__", {}) if module is not None else None
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno, name, registry)
