"""Errors that the CLI turns into one line on stderr and a meaningful exit code; PIL's own warnings kept quiet where
sdtune names the file itself."""

import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator


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


PACKAGE_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` at the line that called into sdtune (a notebook's cell, a script's `sdtune.train(...)`), not at
    sdtune's own: the caller of the outermost sdtune frame on the stack, however deep the warning is raised (through
    contextlib, torch's data loader, ...). `stacklevel` counts frames, and `skip_file_prefixes` needs Python 3.12."""
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
    come again each time a header is read; data.readable_images names them once, with their file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield
