"""The one exception a user sees for a model they gave us (kept apart so every models/ module can raise it)."""


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded; the message is one sentence for the user."""
