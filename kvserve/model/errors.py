"""The one error a model load raises, shared by the loaders and the tokenizer."""


class ModelLoadError(Exception):
    """A model could not be loaded; the message is one line a user can act on."""
