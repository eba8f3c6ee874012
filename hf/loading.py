"""Loading Hugging Face folders for the CLIs (generate.py, evaluate_lm.py) without running code the
user did not ask to run.

Importing the `models` package registers Hyena-RTF with transformers' Auto classes, so this
project's own checkpoints load from the repository's code, whatever Python files their folder
holds. Any other custom architecture needs `trust_remote_code=True`, which the CLIs pass only
when the user gives `--trust-remote-code`; without it, transformers' refusal becomes one line that
names the flag. (Not part of the exported model code.)
"""

from __future__ import annotations

import hyena_rtf.models  # noqa: F401  (registers the Auto classes; see above)


class RemoteCodeRefused(ValueError):
    """The folder needs its own Python code and the user did not pass --trust-remote-code."""


def from_pretrained(auto_class, path, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(path, trust_remote_code=..., **kwargs)`; a refusal to run the
    folder's code is re-raised as RemoteCodeRefused with a one-line message."""
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeRefused(
            f"{path} needs the Python code stored in it ({auto_class.__name__}); "
            "if you trust that code, add --trust-remote-code"
        ) from None
