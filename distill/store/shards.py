"""The store's files: shard names, writing a shard and its sidecar, checking shards, reading the manifest."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distill.disk import writing
from distill.errors import DistillError
from distill.models import sha256_file
from distill.runs import write_json

FORMAT_VERSION = 2  # 2: per-row logit mean/std; top-k keeps the tail's own log-sum-exp and mean
MANIFEST = "manifest.json"
FLOAT16_MAX = 65504.0
# how the reader spreads a top-k tail over its classes (reader.reconstruct_topk), named in the manifest
TAIL_SPREAD = "even, mass at T from log-sum-exp and mean"
# the command that rebuilds a store from the saved teacher (no fine-tuning); `distill run` only finishes one
REBUILD = "distill teach <recipe.yaml> --export-only --rebuild-targets"
# a shard write that fails midway: the complete shards stay, and the export resumes from them
RESUMABLE = ("the shards written so far are kept; free some space and resume the export (distill run, or "
             "distill teach <recipe.yaml> --export-only)")


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def shard_complete(out: Path, s: int, fp: str) -> bool:
    """A shard counts only when its sidecar exists, carries this fingerprint and its sha256 matches."""
    sidecar, data = out / f"{shard_name(s)}.json", out / f"{shard_name(s)}.safetensors"
    if not (sidecar.is_file() and data.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text())
    except ValueError:
        return False
    return info.get("fingerprint") == fp and info.get("sha256") == sha256_file(data)


def write_shard(out: Path, s: int, first: int, last: int, fp: str, what: dict, logit_spec: dict,
                logits: torch.Tensor, params: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None = None,
                partners: torch.Tensor | None = None, mixes: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    # every statistic comes from the float32 logits, before any rounding to float16 or cut to the top k
    logits = logits.float()
    tensors = {"params": params.float().contiguous(), "label": labels.long().contiguous(),
               # what losses.standardize computes of a row (torch's unbiased std), of the whole float32 vector
               "logit_mean": logits.mean(-1).contiguous(), "logit_std": logits.std(-1).contiguous()}
    if seeds is not None:  # targets.augment: each row's augmentation seed (-1: none); a store without it has no column
        tensors["seed"] = seeds.long().contiguous()
    if partners is not None:  # targets.mix: each row's partner (sample, view; -1: unmixed) and λ / CutMix box
        tensors["partner"] = partners.long().contiguous()
        tensors["mix"] = mixes.float().contiguous()
    if logit_spec["storage"] == "full":
        tensors["logits"] = logits.clamp(-FLOAT16_MAX, FLOAT16_MAX).half()
    else:
        top = logits.topk(logit_spec["k"], dim=-1)
        tensors["topk_logits"] = top.values.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().contiguous()
        tensors["topk_index"] = top.indices.to(getattr(torch, logit_spec["index_dtype"])).contiguous()
        # the tail's own statistics: its mass at T = 1 is exp(tail_lse - lse), known to float32 precision
        # however small (1 - Σ top-k of float16 values loses it), and with its mean it fixes the spread
        tail = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top.indices, False)
        tensors["tail_lse"] = logits.masked_fill(~tail, -float("inf")).logsumexp(-1).contiguous()
        n_tail = max(logits.shape[-1] - logit_spec["k"], 1)
        tensors["tail_mean"] = (logits.masked_fill(~tail, 0.0).sum(-1) / n_tail).contiguous()
    name = shard_name(s)
    tmp, data = out / f".{name}.safetensors.tmp", out / f"{name}.safetensors"
    # one metadata key: safetensors writes several in hash order, and then equal shards would differ in bytes
    about = json.dumps({"fingerprint": fp, "first_sample": first, "last_sample": last}, sort_keys=True)
    with writing(data, tmp, what="targets", hint=RESUMABLE):
        save_file(tensors, str(tmp), metadata={"distill": about})
        os.replace(tmp, data)
    # the sidecar is the shard's "complete" mark: written after the data, also through a rename
    try:
        write_json(out / f"{name}.json", {"shard": s, "first_sample": first, "num_samples": last - first,
                                          "rows": len(params), "sha256": sha256_file(data),
                                          "fingerprint": fp, "what": what})
    except BaseException:
        data.unlink(missing_ok=True)  # a shard without its sidecar is exported again anyway: leave no orphan
        raise


def damaged_shards(out: Path, manifest: dict) -> list[str]:
    """The shard files of a manifest that are missing or whose sha256 is not the recorded one."""
    return [sh["file"] for sh in manifest["shards"]
            if not (out / sh["file"]).is_file() or sha256_file(out / sh["file"]) != sh["sha256"]]


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{out / MANIFEST}: unreadable ({e}); rebuild the store with "
                           f"{REBUILD}") from None


def check_version(out: Path, manifest: dict) -> None:
    """Refuse a store this distill cannot read: another format, or one written by an older (or newer) distill."""
    if manifest.get("format") != "distill-targets":
        raise DistillError(f"targets: {out} is not a distill store ({MANIFEST} has format "
                           f"{manifest.get('format')!r}); rebuild it with {REBUILD}")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise DistillError(f"targets: the store at {out} was written by {'an older' if older else 'another'} distill "
                           f"(store format {version}, this one reads {FORMAT_VERSION}"
                           f"{': per-row logit mean/std and the top-k tail statistics are new' if older else ''}); "
                           f"rebuild it from the saved teacher with {REBUILD}")
