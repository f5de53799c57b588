"""Typed errors. Library code raises these; only the CLI edge turns them into one line and an exit code."""


def exception_chain(e: BaseException) -> list[BaseException]:
    """e, then its causes and contexts in order (no cycles)."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


class QtuneError(Exception):
    """A user-facing problem: bad input, missing file, a machine that cannot run the request."""

    exit_code = 1


class ConfigError(QtuneError):
    """A wrong config key, type, choice or combination (caught at compose time)."""

    exit_code = 2


class DataError(QtuneError):
    """Malformed or empty input data; the message names file:line and the field."""


class DownloadError(QtuneError):
    """A model could not be fetched or verified."""


class DamagedFile(QtuneError):
    """A file qtune wrote (an adapter, a checkpoint, a merged model, a run's config) is truncated or corrupt;
    the message names it and what to do."""


class InUse(QtuneError):
    """A folder another live process is writing (a run being trained into); the message names that process."""


class DiskFull(QtuneError):
    """The disk (or the quota) filled up while qtune wrote an output; the message names the folder, what it needed and
    what was free, and says that nothing half-written was left."""
