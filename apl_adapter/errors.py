"""Errors raised by apl-adapter, each naming the problem and the fix."""


class APLAdapterError(ValueError):
    """Bad input to an APL adapter: a wrong model, a bad config, an unusable adapter file."""
