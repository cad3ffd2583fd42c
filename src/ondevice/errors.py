"""One error type for everything the user can fix; the CLI prints it without a traceback."""

from __future__ import annotations


class OndeviceError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


class ModelNotFound(OndeviceError):
    """An unknown model name or a missing file."""


class InvalidModelFile(OndeviceError):
    """A file that is not a valid GGUF (truncated, corrupt, wrong magic...)."""


class ContextOverflow(OndeviceError):
    """A prompt that does not fit in the context window.

    The engine raises it without knowing which verb called it; the verb adds the fix that is true for its
    own flags with :meth:`advise` (run and chat: ``-c/--ctx``; bench: ``-c/--ctx-size``; eval suites:
    ``--ctx-size``; serve: ``--ctx``, the per-slot context), so the message never names another verb's flag.
    """

    def __init__(self, n_prompt: int, n_ctx: int, what: str = "prompt", fix: str | None = None):
        self.n_prompt, self.n_ctx, self.what = n_prompt, n_ctx, what
        self.fix = fix or ("shorten it or load the model with a larger context window "
                           "(n_ctx, at most the model's trained context)")
        super().__init__(f"the {what} has {n_prompt} tokens but the context window holds {n_ctx}; {self.fix}")

    def advise(self, flag: str, n_ctx_train: int | None = None, *alternatives: str,
               shorten: str | None = "shorten it") -> ContextOverflow:
        """The same overflow, its fix naming ``flag``: raise it (up to ``n_ctx_train``) unless it is at the
        trained context already; ``alternatives`` are further fixes ("... or ...")."""
        at_max = bool(n_ctx_train) and self.n_ctx >= n_ctx_train
        fixes = [shorten] if shorten else []
        if not at_max:
            fixes.append(f"raise {flag}" + (f" (at most the model's trained context, {n_ctx_train})"
                                            if n_ctx_train else ""))
        fixes += alternatives
        fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
        if at_max:
            fix += f" ({flag} is already the model's trained context, {n_ctx_train})"
        return ContextOverflow(self.n_prompt, self.n_ctx, self.what, fix)


class InvalidArgument(OndeviceError):
    """A flag or parameter with a value outside its range. ``param``: the request field it is about, where one
    is (the server's error body names it, as OpenAI's ``param``)."""

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param


class UnknownArgument(InvalidArgument, TypeError):
    """A keyword argument the function does not take, with the closest name it does; a ``TypeError`` too, as
    Python's own ``got an unexpected keyword argument`` is."""


class KVCacheTooLarge(InvalidArgument):
    """The context's KV cache needs more memory than is available (refused before llama.cpp allocates it); under
    a bench's device profile, the run does not fit that device's memory."""


class NonFiniteLogits(OndeviceError):
    """llama.cpp computed NaN or infinite logits: the output means nothing. The cause is a NaN or inf in what
    computed them: the model's weights, a LoRA adapter in use, or KV state restored from a file."""

    def __init__(self, where: str = "logits", adapters: tuple[str, ...] | list[str] = (),
                 restored: str | None = None):
        """``adapters``: the LoRA adapters in use, ``restored``: the slot or prompt-cache file whose KV the
        sequence holds, where the raiser knows them (named first: the likelier causes)."""
        causes = []
        if restored:
            causes.append(f"the KV state restored from {restored} (a damaged file: erase the slot or start without "
                          f"the prompt cache, and save it again)")
        if adapters:
            causes.append(f"the LoRA adapter{'s' if len(adapters) > 1 else ''} {', '.join(adapters)} (a NaN or "
                          f"inf in its weights: run without it to check, then train or convert it again)")
        weights = "the model's weights (a NaN or inf in the file: download or convert the model again)"
        if causes:
            why = "; likely causes: " + ", or ".join([*causes, weights])
        else:
            why = (": its weights are likely damaged (a NaN or inf in the file); download or convert the model again "
                   "(or, if a LoRA adapter or a restored slot / prompt-cache file is in use, run without it: it may "
                   "hold the NaN instead)")
        super().__init__(f"the model computed NaN or infinite {where}, so its output means nothing{why}")


class StreamAbandoned(OndeviceError):
    """A stream read again after it was left unread while another call on its model waited (and took over)."""


class ModelClosed(OndeviceError):
    """A model used after ``close()``."""


NOT_THERE = ("no such file", "a broken symbolic link", "a symbolic link loop")  # path_problem's "not found" kinds


def path_problem(path) -> str | None:
    """Why ``path`` is not a regular file that can be read, in a few words ("no such file", "a symbolic link
    loop", "a character device, not a file", ...), or None when it is one. One wording for every verb."""
    import errno
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return e.strerror or str(e)
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), None)
    return None if stat.S_ISREG(mode) else f"{kind or 'not a regular file'}, not a file"
