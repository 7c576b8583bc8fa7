"""Ensembles: several saved models of the same classes as one (`Ensemble`), out-of-fold routing, save and load."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from distill.data import Preprocess
from distill.models.common import FORMAT_VERSION, INFO_FILE, MODEL_FILE
from distill.models.folder import json_default, load_model, member_info, saved_preprocess


class Ensemble(nn.Module):
    """Several classifiers of the same classes as one model. The input is normalised for the ensemble's
    preprocessing; each member gets it at its own input size and normalisation (crop differences are not
    redone). The output: log of the mean softmax probability (combine "probs": a proper mixture, so NLL and
    a later softmax(· / T) keep their meaning), the mean logit ("logits"), or the log of the smoothed vote
    shares ("vote", `vote_log_probs`)."""

    def __init__(self, members: list[tuple[nn.Module, Preprocess]], pre: Preprocess, combine: str):
        super().__init__()
        self.members = nn.ModuleList(m for m, _ in members)
        self.pres, self.pre, self.combine = [p for _, p in members], pre, combine

    def member_input(self, x: torch.Tensor, p: Preprocess) -> torch.Tensor:
        if (p.input_size, p.mean, p.std) == (self.pre.input_size, self.pre.mean, self.pre.std):
            return x
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.pre.mean, self.pre.std))
        pixels = x * std + mean
        if p.input_size != x.shape[-1]:
            mode = "bilinear" if p.interpolation == "nearest" else p.interpolation.replace("area", "bilinear")
            pixels = torch.nn.functional.interpolate(pixels, size=(p.input_size, p.input_size), mode=mode,
                                                     align_corners=False, antialias=True)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (p.mean, p.std))
        return (pixels - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(self.member_input(x, p)).float() for m, p in zip(self.members, self.pres)])
        if self.combine == "logits":
            return outs.mean(0)
        if self.combine == "vote":
            return vote_log_probs(outs)
        return torch.logsumexp(torch.log_softmax(outs, -1), 0) - math.log(len(outs))


VOTE_PRIOR = 0.5  # β: the mean probability's weight in pseudo-votes; below 1, so it only ever breaks ties


def vote_log_probs(outs: torch.Tensor) -> torch.Tensor:
    """Hard voting of M members' logits [M, B, K]: each member votes for its argmax, and the output [B, K] is

        log p_k,   p_k = (v_k + β · m_k) / (M + β)

    with v_k the votes for class k and m_k the members' mean softmax probability (β = `VOTE_PRIOR` = 0.5). The
    argmax of p is the class with the most votes; a tie goes to the tied class with the larger mean probability
    (β · |m_a - m_b| < 1 can never outweigh one vote), and only an exact tie of both to the lower index. p is a
    distribution, so NLL and ECE stay defined; but it is nearly a histogram of M votes: it carries little of
    the between-class similarity ("dark knowledge") that KD transfers, which is why a store of a voting
    ensemble's targets is refused (recipe/loading.py). Computed in log space, so no class gets -inf.
    """
    m = outs.shape[0]
    log_probs = torch.log_softmax(outs, -1)
    votes = torch.nn.functional.one_hot(outs.argmax(-1), outs.shape[-1]).sum(0).to(log_probs.dtype)
    log_prior = torch.logsumexp(log_probs, 0) - math.log(m) + math.log(VOTE_PRIOR)  # log(β · m_k)
    return torch.logaddexp(votes.log(), log_prior) - math.log(m + VOTE_PRIOR)


class OutOfFold(nn.Module):
    """Soft targets that never come from a model trained on the image's label (targets.oof): labeled sample i
    goes to the fold teacher that held it out (`folds[i]`, the members' order); any other sample (unlabeled
    images, after the labeled ones) to the whole ensemble."""

    routes_by_sample = True

    def __init__(self, ensemble: Ensemble, folds: torch.Tensor):
        super().__init__()
        self.ensemble, self.folds = ensemble, folds

    def forward(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        fold = torch.full_like(sample_ids, -1)
        labeled = sample_ids < len(self.folds)
        fold[labeled] = self.folds[sample_ids[labeled]]
        fold = fold.to(x.device)
        out = None
        for f in fold.unique().tolist():
            rows = fold == f
            if f < 0:
                z = self.ensemble(x[rows])
            else:
                member, p = self.ensemble.members[f], self.ensemble.pres[f]
                z = member(self.ensemble.member_input(x[rows], p)).float()
            out = z.new_empty(len(x), z.shape[-1]) if out is None else out
            out[rows] = z
        return out



def save_ensemble(out_dir, member_dirs: list, combine: str, classes: list[str], extra: dict | None = None,
                  eval_augment: list | None = None) -> dict:
    """Write out_dir/model.json describing an ensemble of saved models (no weights of its own): `load_model`
    rebuilds it. Its sha256 is that of its members' sha256s and the combine rule, so a store made by another
    ensemble is told apart. The ensemble's preprocessing is the largest member input's; `eval_augment` the
    albumentations eval list it is evaluated with (None: the default eval transform), as in `save_model`."""
    out = Path(out_dir)
    infos = [member_info(Path(d), classes, "teacher.ensemble_with") for d in member_dirs]
    first = max((i["preprocess"] for i in infos), key=lambda p: p["input_size"])
    members = [os.path.relpath(Path(d).resolve(), out.resolve()) for d in member_dirs]
    digest = hashlib.sha256(json.dumps([[i["sha256"] for i in infos], combine]).encode()).hexdigest()
    info = {"format": FORMAT_VERSION, "source": "ensemble", "members": members, "combine": combine,
            "num_classes": len(classes), "classes": list(classes), "preprocess": first, "eval_augment": eval_augment,
            "sha256": digest, "params": sum(i.get("params", 0) for i in infos), "extra": extra or {},
            "model": "ensemble of " + ", ".join(str(i.get("model") or i.get("name")) for i in infos)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=json_default))
    # a single model's weights, timm/transformers config and card from before would contradict it
    for name in (MODEL_FILE, "config.json", "preprocessor_config.json"):
        (out / name).unlink(missing_ok=True)
    os.replace(tmp, out / INFO_FILE)
    return info


def load_ensemble(d: Path, info: dict) -> tuple[nn.Module, Preprocess, dict]:
    """(Ensemble in eval mode, preprocess, model.json) of a folder written by `save_ensemble`; its members are
    loaded from their own folders (paths relative to `d`)."""
    members = [load_model(d / m)[:2] for m in info["members"]]
    pre = saved_preprocess(info)
    return Ensemble(members, pre, info["combine"]).eval(), pre, info
