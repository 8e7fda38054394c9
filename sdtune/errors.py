"""Errors that the CLI turns into one line on stderr and a meaningful exit code."""


class SdtuneError(Exception):
    """A problem the user can fix (bad input, missing model, wrong adapter): exit code 2."""

    exit_code = 2


class TrainingFailed(SdtuneError):
    """Training started but could not go on (for example a non-finite loss): exit code 1."""

    exit_code = 1


class SweepFailed(SdtuneError):
    """A sweep went through its runs but some failed (each recorded in its folder): exit code 1."""

    exit_code = 1
