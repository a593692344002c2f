"""Errors a user can cause, each naming the input and what is wrong with it.

Everything raised for bad user input derives from `InputError`, so the CLI, the chat loop and the
server can report it (400 in HTTP) and carry on, while real bugs still surface as other exceptions.
"""


class InputError(ValueError):
    """A request input (file, media bytes, parameter, prompt) is unusable."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class MediaError(InputError):
    """A media input is missing, unreadable, corrupt or of an unsupported format."""


class ContextLengthError(InputError):
    """The prompt (plus requested output) does not fit the model's context."""


class MediaTooLargeError(MediaError):
    """A media input is beyond a configured limit (bytes, pixels, seconds)."""


class OutOfMemoryError(InputError):
    """A request needed more accelerator memory than was free (its media or prompt chunk too large
    for what the server has left); the request is refused, the server carries on."""
