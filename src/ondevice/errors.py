"""One error type for everything the user can fix; the CLI prints it without a traceback."""

from __future__ import annotations


class OndeviceError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


class ModelNotFound(OndeviceError):
    """An unknown model name or a missing file."""


class InvalidModelFile(OndeviceError):
    """A file that is not a valid GGUF (truncated, corrupt, wrong magic...)."""


class ContextOverflow(OndeviceError):
    """A prompt that does not fit in the context window."""

    def __init__(self, n_prompt: int, n_ctx: int, what: str = "prompt"):
        self.n_prompt, self.n_ctx = n_prompt, n_ctx
        super().__init__(
            f"the {what} has {n_prompt} tokens but the context window holds {n_ctx}; "
            f"shorten it or raise --ctx (at most the model's trained context)"
        )


class InvalidArgument(OndeviceError):
    """A flag or parameter with a value outside its range."""
