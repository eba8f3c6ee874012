"""Loading Hugging Face checkpoint folders for the command lines (generate.py, evaluate_lm.py)
without running code the user did not ask to run, and with one-line errors.

Importing `models` registers Hyena-RTF with transformers' Auto classes, so this project's
own checkpoints load from the installed code, whatever Python files their folder holds. Any other
custom architecture needs `trust_remote_code=True`, which the CLIs pass only when the user gives
`--trust-remote-code`; without it, transformers' refusal becomes one line that names the flag.

The trust_remote_code policy in full: docs/transformers.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

import models  # noqa: F401  (registers the Auto classes; see above)
from data_prep.tokenizer import hf_tokenizer


class LoadError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming the folder."""


class RemoteCodeRefused(LoadError):
    """The folder needs its own Python code and the user did not pass --trust-remote-code."""


def check_model_folder(path: str | Path) -> Path:
    """The folder as a Path, or LoadError: missing, not a folder, no config.json or an invalid one.
    Cheap (no model code runs), so the CLIs call it before any long work."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"checkpoint folder not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise LoadError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"invalid {config}: {e}") from None
    return path


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


# Loading a model reports which weights did not match instead of raising or warning about them:
# `check_weights_match` then refuses the folder, naming them (transformers' own error for a shape
# mismatch points at a report that its held-back warnings would have printed).
MODEL_LOAD_REPORT = {"output_loading_info": True, "ignore_mismatched_sizes": True}


def load_pretrained(auto_class, what: str, path, trust_remote_code: bool = False, **kwargs):
    """`from_pretrained` for a CLI: the folder is checked first, transformers' warnings are held back
    while it loads, and any failure (refused remote code, invalid hyper-parameters, truncated
    weights) becomes one LoadError line, "could not load the {what} from {path}: ...".

    A model must find exactly its weights in the folder (`check_weights_match`): transformers only
    warns about missing or unused weights, and leaves a missing one as it was allocated."""
    check_model_folder(path)
    is_model = hasattr(auto_class, "_model_mapping")  # the Auto*Model* classes; not AutoConfig/AutoTokenizer
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a failed load should read as one line, not a page of warnings
    try:
        loaded = from_pretrained(
            auto_class, path, trust_remote_code, **kwargs, **(MODEL_LOAD_REPORT if is_model else {})
        )
    except RemoteCodeRefused:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the user needs one line
        message = " ".join(str(e).split()) or type(e).__name__
        raise LoadError(f"could not load the {what} from {path}: {message[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_model:
        return loaded
    model, info = loaded
    check_weights_match(path, info)
    return model


def check_weights_match(path, info: dict) -> None:
    """LoadError naming the first few keys when from_pretrained's loading `info` reports weights the
    model has and the folder lacks (they would hold whatever memory was allocated: NaN, 1e28),
    weights of the wrong shape, or weights the folder has and the model does not use (config.json
    and the weights disagree, e.g. on n_layer)."""
    for field, what in (
        ("missing_keys", "has no weights for"),
        ("mismatched_keys", "has weights of the wrong shape for"),
        ("unexpected_keys", "has weights the model does not use:"),
    ):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(field) or []]
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise LoadError(f"{path} {what} {shown}: its weights do not match its config.json")


# The files a Hugging Face tokenizer keeps its vocabulary in (fast, sentencepiece, BPE, WordPiece, tiktoken).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tekken.json")


def load_tokenizer(path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The folder's tokenizer through AutoTokenizer; a folder that holds only a tokenizer.json
    (no tokenizer_config.json, or a model type AutoTokenizer does not know) gets the fast tokenizer
    built from that file, with the project's end-of-text choice."""
    try:
        return load_pretrained(AutoTokenizer, "tokenizer", path, trust_remote_code)
    except RemoteCodeRefused:
        raise
    except LoadError:
        tokenizer_json = Path(path) / "tokenizer.json"
        if not tokenizer_json.is_file():
            if not any((Path(path) / name).is_file() for name in VOCABULARY_FILES):
                # transformers' own message would ask for sentencepiece or tiktoken
                raise LoadError(f"{path} has no tokenizer: no tokenizer.json (nor another vocabulary file)") from None
            raise
        try:
            tokenizer = hf_tokenizer(tokenizer_json)
        except (OSError, ValueError) as e:  # TokenizerError is a ValueError
            raise LoadError(f"could not load the tokenizer from {path}: {' '.join(str(e).split())[:300]}") from None
        tokenizer.name_or_path = str(path)  # as AutoTokenizer sets it: messages name the folder
        return tokenizer
