"""Errors a user can cause: caught once at the CLI and printed as one line."""

# exit codes, documented in `agentprobe watch --help`
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_KERNEL = 3
EXIT_PERMISSION = 4
EXIT_BUSY = 5


class AgentprobeError(Exception):
    """An error with a message meant for the user; `exit_code` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
