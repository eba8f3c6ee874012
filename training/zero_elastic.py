"""Elastic resume for DeepSpeed ZeRO 1/2: a checkpoint saved on N processes resumes on M.

DeepSpeed's own checkpoint holds one optimizer partition per rank (the rank's slice of the flat
fp32 master weights and of AdamW's moments), and DeepSpeed 0.19.8 refuses to load it under another
data-parallel world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported"). So every DeepSpeed checkpoint also holds, beside
DeepSpeed's files:

    zero_full_state.pt    the full (unpartitioned) float32 master weights and AdamW state of every
                          parameter, by parameter name, plus the optimizer's per-group scalars
                          (its step count); nothing but tensors, strings, ints, lists and dicts

Saving (collective): each rank copies the fragments it owns into zeroed full-size buffers, one per
parameter group and state, and a sum-reduce onto rank 0 assembles them. Every element is owned by
exactly one rank and added to zeros, so the assembled values are bit-exact. Only rank 0, the
writer, copies the assembled tensors to the host (the others take part in the reduces and copy
nothing: at 1.3b the full weights and both moments are ~15.6 GB per copy). Rank 0 writes the file
into the checkpoint folder before checkpoint.py writes manifest.json, so the manifest covers it.

Resuming on the saved world size is DeepSpeed's own load, untouched (bit-exact, as before). On
another world size (`load_resized`):

    1. DeepSpeed loads the module weights and its step counters (`load_optimizer_states=False`: the
       one part of its load that does not depend on the partitioning), then fills its fp32
       partitions from those weights;
    2. zero_full_state.pt is read with `torch.load(weights_only=True)` (tensors only, no code can
       run) and this rank's slices are cut out of it: each parameter's DeepSpeed fragment mapping
       (`param._hp_mapping`, the addresses `safe_set_full_fp32_param` uses) says which elements of
       the parameter live where in this rank's flat partition. The slices overwrite the fp32
       partition and become AdamW's state for it; the module weights are set from the same fp32
       values, so both copies agree exactly.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`): the
conversion is an offline step over DeepSpeed's pickled files that writes one folder per parameter,
and both the conversion and the engine's universal load unpickle with `weights_only=False`, so
files added to a checkpoint would be loaded with full unpickling; the universal flag must also be
in the config before the engine is built, and the conversion runs a process pool at resume time.
The file here is written by this code, loaded only through torch's restricted unpickler, covered
by the SHA-256 manifest like every other file, and needs no conversion step.

Costs and limits: each DeepSpeed checkpoint grows by 12 bytes per parameter (weights and two
moments), saving reduces the whole optimizer state once onto rank 0, and a resized resume reads
the whole file on every rank (so each briefly holds 3 full fp32 copies of the model). Pure data parallelism
only (the reduce runs over the default process group), ZeRO stages 1 and 2, a torch optimizer
whose per-parameter state is partition-shaped tensors plus per-group scalars (AdamW). A checkpoint
written before this file existed resumes on its own world size only (resume.py says so).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

FULL_STATE_FILE = "zero_full_state.pt"
FULL_STATE_FORMAT = "hyena-rtf-zero-full-state/1"


def has_full_state(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, FULL_STATE_FILE))


def group_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer group, taken before DeepSpeed replaces the groups' params
    with its flat partitions; the names key zero_full_state.pt."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A tensor's host copy (the tensor itself when it is on the CPU already): the one place the
    full state leaves the device, so that a test can count the copies each rank makes."""
    return t.cpu()


class ZeroFullState:
    """Gathers and re-partitions the ZeRO 1/2 optimizer state of one DeepSpeed engine."""

    def __init__(self, ds_engine, group_names: list[list[str]]):
        self.ds = ds_engine
        self.group_names = group_names
        self.params = dict(ds_engine.module.named_parameters())
        self.base = ds_engine.optimizer.optimizer  # the torch AdamW that steps the flat partitions
        if len(self.base.param_groups) != len(group_names):
            raise RuntimeError("DeepSpeed changed the number of optimizer groups; elastic checkpoints cannot map them")

    def _flat(self, gi: int) -> torch.Tensor:
        """This rank's flat fp32 partition of group gi (the one tensor AdamW steps for the group)."""
        params = self.base.param_groups[gi]["params"]
        if len(params) != 1:
            raise RuntimeError("expected one flat fp32 partition per optimizer group (ZeRO stage 1 or 2)")
        return params[0]

    def _fragments(self, gi: int):
        """(name, mapping) of group gi's parameters that have elements in this rank's partition."""
        for name in self.group_names[gi]:
            mapping = getattr(self.params[name], "_hp_mapping", None)
            if mapping is not None:
                yield name, mapping

    def _gather(self, gi: int, partition: torch.Tensor, writer: bool) -> dict[str, torch.Tensor]:
        """Full tensors, by name, of a partition-shaped tensor of group gi, on the host: on the
        `writer` (rank 0, where the reduce lands); {} on the other ranks, which only contribute."""
        names = self.group_names[gi]
        sizes = [self.params[n].numel() for n in names]
        starts = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
        full = torch.zeros(sum(sizes), dtype=torch.float32, device=partition.device)
        for name, m in self._fragments(gi):
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            full.narrow(0, starts[name] + lp.start, lp.numel).copy_(partition.detach().narrow(0, hp.start, hp.numel))
        dist.reduce(full, dst=0, op=dist.ReduceOp.SUM)
        if not writer:
            return {}
        full = _to_host(full)
        return {
            n: full.narrow(0, starts[n], s).view_as(self.params[n]).clone() for n, s in zip(names, sizes, strict=True)
        }

    def _scatter(self, gi: int, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's partition of group gi cut out of full tensors by name (padding stays 0)."""
        flat = self._flat(gi)
        part = torch.zeros_like(flat, dtype=torch.float32)
        for name, m in self._fragments(gi):
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            part.narrow(0, hp.start, hp.numel).copy_(full[name].reshape(-1).narrow(0, lp.start, lp.numel))
        return part

    def state_dict(self, writer: bool | None = None) -> dict:
        """Collective. The full state (see the module docstring), complete on the writer (rank 0
        unless `writer` says otherwise); on the other ranks its tensor entries are empty and they
        make no host copy."""
        if writer is None:
            writer = dist.get_rank() == 0
        fp32: dict[str, torch.Tensor] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {}
        scalars = []
        for gi in range(len(self.group_names)):
            flat = self._flat(gi)
            fp32.update(self._gather(gi, flat, writer))
            state = self.base.state.get(flat, {})
            # Every rank steps every group together, so all hold the same keys (none before the
            # first applied step), and the non-partition entries (the step count) are equal.
            for key, value in sorted(state.items()):
                if torch.is_tensor(value) and value.shape == flat.shape:
                    moments.setdefault(key, {}).update(self._gather(gi, value, writer))
            if writer:
                scalars.append(
                    {
                        k: _to_host(v.detach()).clone() if torch.is_tensor(v) else v
                        for k, v in state.items()
                        if not (torch.is_tensor(v) and v.shape == flat.shape)
                    }
                )
        return {
            "format": FULL_STATE_FORMAT,
            "world_size": dist.get_world_size(),
            "groups": self.group_names,
            "fp32": fp32,
            "state": moments,
            "scalars": scalars,
        }

    def save(self, ckpt_dir: str) -> None:
        """Collective; rank 0 writes ckpt_dir/zero_full_state.pt."""
        writer = dist.get_rank() == 0
        sd = self.state_dict(writer)
        if writer:
            torch.save(sd, os.path.join(ckpt_dir, FULL_STATE_FILE))

    def load_resized(self, ckpt_dir: str, tag: str) -> int:
        """Collective. Resume a checkpoint saved on another world size; returns that world size."""
        path = os.path.join(ckpt_dir, FULL_STATE_FILE)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or sd.get("format") != FULL_STATE_FORMAT:
            raise RuntimeError(f"{path} is not a ZeRO full-state file of this version ({FULL_STATE_FORMAT})")
        if sd["groups"] != self.group_names:
            raise RuntimeError(f"{path} holds other parameters or groups than this model's optimizer")
        loaded, _ = self.ds.load_checkpoint(
            ckpt_dir, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the module weights in {ckpt_dir}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(sd["fp32"][name])
            for gi in range(len(self.group_names)):
                flat = self._flat(gi)
                flat.copy_(self._scatter(gi, sd["fp32"]))
                state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd["scalars"][gi].items()}
                state.update({key: self._scatter(gi, full) for key, full in sd["state"].items()})
                if state:
                    self.base.state[flat] = state
        # DeepSpeed links each parameter's view of the optimizer state lazily, at the next step;
        # make sure that link is made to the tensors set here.
        self.ds.optimizer._hp_optimizer_states_linked = False
        return int(sd["world_size"])
