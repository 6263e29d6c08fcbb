"""Errors that name the problem. Every user-facing failure raises one of these."""


class FunchatError(Exception):
    """Base class: a problem with the caller's input, never a bug in funchat."""


class AudioInputError(FunchatError):
    """Audio that cannot be used: unreadable, empty, non-finite, too long or wrongly shaped."""


class CheckpointError(FunchatError):
    """A checkpoint directory that does not match the model it declares."""


class PresetError(FunchatError):
    """An unknown model preset name."""


class PromptError(FunchatError):
    """A prompt or feature set that does not fit the checkpoint (ids, placeholders, mel bins)."""


class ContextOverflowError(PromptError):
    """The prompt does not fit in the model's context window."""
