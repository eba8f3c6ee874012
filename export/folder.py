"""Write a Hugging Face checkpoint folder that loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `AutoTokenizer`.

The folder holds config.json (with auto_map), the model code (modeling_hyena_rtf.py and every file
it imports relatively), model.safetensors, generation_config.json and the tokenizer files. It is
built in a staging folder beside the target and swapped in at the end (utils/atomic.py), so a
crash never leaves a folder that looks complete and never loses the previous export.

A model transformers has built in (the GPT-NeoX baseline train.py trains with model.arch=gpt_neox)
is written as a plain folder: no code, no auto_map, loadable without trust_remote_code. Its
config.json carries one extra key, EXPORT_MARKER = its model_type, which says where it came from.

Ownership is by stamp, never by name. Every export holds the stamp file `.hyena-rtf-output.json`
(utils/atomic.py: a random id and the name and size of every file the export wrote). An existing
target is replaced only if it is empty, or stamped as an export and holding nothing but the files
its stamp lists (plus the caller's `also_owned` names), unless the caller passes overwrite=True (the
user's explicit consent, `--overwrite`); a target that is a file is always refused. So a re-export
replaces exactly the files the previous export recorded writing; any other file in the folder (a
`finetune.py`, notes, an unstamped folder of `*.partial` files) makes it refuse with one line
naming the file, and nothing is touched: the export never deletes or moves what it did not write.
An export written before the stamp existed counts as foreign (`--overwrite` replaces it).

Errors: a target that is not ours, not writable, or that contains the tokenizer being exported is
refused (NotReplaceableError / OutputError, one line) before any work; an OSError while writing
(full disk, read-only folder, permission denied, a file removed meanwhile) becomes one OutputError
line naming the path, and the target is left as it was; so does a KeyboardInterrupt, which
propagates (the command lines turn it into exit status 130).

Folder layout and the custom-code rules: docs/transformers.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel

from data_prep.tokenizer import hf_tokenizer
from models.configuration_hyena_rtf import HyenaRTFConfig
from models.modeling_hyena_rtf import HyenaRTFForCausalLM, HyenaRTFModel
from models.precision import is_filter_param
from utils.atomic import (
    NotReplaceableError,
    check_apart,
    check_replaceable,
    check_writable,
    locked,
    output_error,
    remove_stale,
    replace_dir,
)

EXPORT_KIND = "Hugging Face export of this project"  # Hyena-RTF, or a plain one (GPT-NeoX)

# The config.json key of a plain (code-free) export; its value is the model_type. It tells where the
# folder came from; whether it may be replaced is the stamp's business.
EXPORT_MARKER = "hyena_rtf_export"


def export_kind(config_json: Path) -> str | None:
    """ "custom" for the config.json of a Hyena-RTF export (model code in the folder), "plain" for
    one of a plain export of ours (EXPORT_MARKER equal to its model_type), else None. Describes a
    folder; it never decides whether one may be replaced (`check_export_target` does, by stamp)."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type == HyenaRTFConfig.model_type:
        return "custom"
    return "plain" if model_type is not None and config.get(EXPORT_MARKER) == model_type else None


def is_export(config_json: Path) -> bool:
    """True when `config_json` is the config.json of an export of ours (`export_kind`)."""
    return export_kind(config_json) is not None


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False, also_owned: tuple[str, ...] = ()) -> None:
    """Raise NotReplaceableError (one line) unless `out_dir` may receive an export: it does not
    exist, is empty, or is an earlier export (its stamp says so) holding only the files that
    export recorded writing, plus the names in `also_owned` (files a caller writes beside an
    export and recognises by their content), or any folder with overwrite=True; and OutputError
    when it cannot be written (a read-only parent folder). Call it before any long work, so a bad
    target fails at once."""
    check_replaceable(out_dir, kind=EXPORT_KIND, also_owned=also_owned, overwrite=overwrite)
    check_writable(out_dir, "the export")


def save_hf_checkpoint(
    model: PreTrainedModel,
    tokenizer_file: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    also_owned: tuple[str, ...] = (),
) -> Path:
    """Save `model` (+ tokenizer) as a self-contained HF folder at `out_dir`; returns the path.
    A HyenaRTFForCausalLM gets its code and auto_map, any other model a plain folder (the module
    docstring).

    dtype: optional dtype for the saved weights (the long filters always stay float32,
    models/precision.py). An existing `out_dir` is replaced only once the new folder is complete,
    and only as `check_export_target` allows (with `also_owned`: names of the caller's own files
    that an earlier run left beside the export; they go with the old folder). `out_dir` may not
    be, contain or lie inside `tokenizer_file` (an input is never an output). Errors: the module
    docstring.
    """
    out = Path(out_dir)
    check_export_target(out, overwrite, also_owned)
    if tokenizer_file is not None:
        check_apart(out, [tokenizer_file], flag="export folder")
    config = model.config
    tok = None
    if tokenizer_file is not None:
        tok = hf_tokenizer(tokenizer_file)
        if len(tok) > config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_file} has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}"
            )
        if tok.eos_token_id is not None:
            config.eos_token_id = tok.eos_token_id
            config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
    if isinstance(model, HyenaRTFForCausalLM):
        # auto_map: AutoConfig, AutoModel (the decoder without its head) and AutoModelForCausalLM.
        type(config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForCausalLM")
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": f"{HyenaRTFModel.__module__.rsplit('.', 1)[-1]}.{HyenaRTFModel.__name__}",
        }
    else:
        setattr(config, EXPORT_MARKER, config.model_type)
    if isinstance(model, HyenaRTFForCausalLM):
        model.store_recurrence()  # decoding-ready: a load skips the filters' O(n^3) conversion (models/rtf.py)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with locked(out):
            remove_stale(out, EXPORT_KIND)
            check_export_target(out, overwrite, also_owned)  # again: another export may have finished meanwhile
            with replace_dir(out, EXPORT_KIND) as staging:
                if dtype is not None and dtype != torch.float32:
                    state = cast_state(model.state_dict(), dtype)
                    model.save_pretrained(staging, state_dict=state)
                    # save_pretrained writes the dtype of the model in memory (float32); the folder's
                    # weights are `dtype`, which from_pretrained(dtype="auto") should load them in.
                    saved = json.loads((staging / "config.json").read_text(encoding="utf-8"))
                    saved["dtype"] = str(dtype).removeprefix("torch.")
                    (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
                else:
                    model.save_pretrained(staging)
                if tok is not None:
                    tok.save_pretrained(staging)
                with_user_umask(staging)
    except NotReplaceableError:
        raise
    except OSError as e:  # full disk, read-only folder, a file removed meanwhile: the old export is intact
        raise output_error(e, out, "the export") from e
    except SafetensorError as e:  # the weights' writer reports the same I/O errors as its own type
        raise output_error(OSError(" ".join(str(e).split())), out, "the export") from e
    return out


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with every tensor but the long filters' cast to `dtype`. A tensor listed under two
    names (a tied LM head: `lm_head.weight` is `model.embed.weight`) is cast once and stays shared, so
    that save_pretrained still recognises the tie and writes it once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        if is_filter_param(name):
            out[name] = t
            continue
        # state_dict() gives each name its own tensor object: the memory it views tells a tie
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device)
        if key not in cast:
            cast[key] = t.to(dtype)
        out[name] = cast[key]
    return out


def with_user_umask(folder: Path) -> None:
    """Give every file in `folder` the mode a new file gets under the user's umask: transformers writes
    the weights through a private temporary file (mode 0600), which a teammate on a shared cluster
    could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
