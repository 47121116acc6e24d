"""The one exception tree of nudgeflow.

    NudgeflowError                 every error we raise on purpose
    ├── ConfigError                settings or rules that cannot be used; refused at start
    │   └── RulesError             a rules file problem, with file and line
    ├── UsageError                 command-line flags that do not fit together
    ├── InputFileError             a file named on the command line cannot be read or written
    └── ServiceError               a service we depend on (Kafka, Redis, dispatch API) failed
        └── DispatchError          the dispatch API refused or kept failing a trigger

Bad *events* are not exceptions: they travel as data (`nudgeflow.core.events.Rejection`)
to the dead letters, so one bad message never stops the flow.
"""

from __future__ import annotations


class NudgeflowError(Exception):
    """Base of every error nudgeflow raises on purpose."""


class ConfigError(NudgeflowError):
    """Settings or rules that cannot be used; raised at start, never mid-stream."""


class RulesError(ConfigError):
    """A rules file that is refused, naming the file, the line and the problem."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


class UsageError(NudgeflowError):
    """Command-line flags that do not fit together."""


class InputFileError(NudgeflowError):
    """A file named by the user cannot be read or written."""


class ServiceError(NudgeflowError):
    """A service nudgeflow depends on failed or cannot be reached."""


class DispatchError(ServiceError):
    """The dispatch API refused a trigger, or kept failing it past the last retry."""

    def __init__(self, trigger_id: str, reason: str) -> None:
        self.trigger_id = trigger_id
        self.reason = reason
        super().__init__(f"dispatch of {trigger_id} failed: {reason}")
