"""Synthetic long-context tasks (recall, copying) solved by the model variants."""
