"""The soft-target store: draw and render replayable views, export teacher logits to shards, read them memory-mapped.

Layout of `targets/` (format version 2; a store of another version is refused with the command that rebuilds it):

    manifest.json                  written last; `complete: true` only when every shard is in
    shard-00000.safetensors        rows of samples [first_sample, first_sample + num_samples)
    shard-00000.json               the shard's sidecar: its sha256 and fingerprint (marks it complete)

A sample has `views + 1` rows: `views` random views (the student's random-resized-crop box and flip,
drawn from a generator seeded by (seed, sample, view), so any process draws the same) and one
deterministic center view, row `views`. Row r of a shard is sample `first_sample + r // (views + 1)`,
view `r % (views + 1)`. Tensors per shard:

    params      float32 [rows, 5]   y0, x0, y1, x1 (normalised crop box), flip (0/1)
    seed        int64   [rows]      only with `targets.augment`: the view's augmentation seed, drawn from (seed,
                                    sample, view); -1 (none) for the center view. The manifest's view_spec then
                                    holds `augment` (the specs, defaults filled in) and `seed_column: "seed"`
    partner     int64   [rows, 2]   only with `targets.mix`: the (sample, view) mixed into the row, -1 unmixed
    mix         float32 [rows, 5]   only with `targets.mix`: λ, then the CutMix box y0, x0, y1, x1 (normalised; all
                                    0 for MixUp); the row's view is the mixed image and its logits the teacher's
                                    output on it (mixing.py). The manifest's view_spec then holds `mix`
    label       int64   [samples]   -1 for unlabeled images
    logit_mean  float32 [rows]      mean of the K float32 logits  } what `kd.standardize` standardises with
    logit_std   float32 [rows]      their std (unbiased)          }
    logits      float16 [rows, K]   storage "full"; or, storage "topk":
    topk_logits float16 [rows, k], topk_index int16/int32 [rows, k],
    tail_lse    float32 [rows]      log-sum-exp of the K - k logits outside the top k (from the float32 logits:
                                    the tail's mass at T = 1, exp(tail_lse - lse), however small)
    tail_mean   float32 [rows]      their mean; with tail_lse it gives the tail's mass at any temperature

All statistics are computed from the teacher's float32 logits, before rounding to float16. The reader rebuilds
a top-k row's tail evenly, with the tail's mass at the student's temperature: exact at T = 1, interpolated
between the tail's mean and its log-sum-exp at other T (`reader.reconstruct_topk`).

Each model renders a view for itself: crop the box out of the original image, resize to its own input
size, flip, then the view's `targets.augment` transforms with parameters drawn from its seed in units that hold at
any size (augment.py), normalise with its own mean/std; so the student sees the very pixels the teacher saw.

Modules: views (drawing and rendering views, the teacher's view dataset), augment (the replayable transforms),
mixing (exact MixUp/CutMix: partners, λ and boxes per view), samples (the samples in order and
the fingerprints), shards (the files: shards, sidecars, manifest), export (the teacher's pass that writes a
store), reader (TargetStore, memory-mapped), diagnostics (the teacher on its own views), replay (the student's
dataset), inspection (`distill inspect`).
"""
from distill.data import Preprocess
from distill.errors import DistillError
from distill.models import sha256_file
from distill.store.diagnostics import diagnostics
from distill.store.export import bytes_per_view, check_space, export, prepare_store, teacher_record
from distill.store.inspection import summary
from distill.store.reader import TargetStore, reconstruct_topk
from distill.store.replay import ReplayDataset
from distill.store.samples import Samples, dataset_fingerprint, fingerprint, logits_spec, view_spec
from distill.store.shards import FLOAT16_MAX, FORMAT_VERSION, MANIFEST, damaged_shards, write_shard
from distill.store.views import PARAM_COLUMNS, center_view, draw_view, render, to_tensor, view_params

# Everything callers import from `distill.store` is re-exported here, and DistillError, Preprocess and
# sha256_file too, as distill.targets gave them. To monkeypatch, patch the module that uses the name.
__all__ = [
    "FLOAT16_MAX",
    "FORMAT_VERSION",
    "MANIFEST",
    "PARAM_COLUMNS",
    "DistillError",
    "Preprocess",
    "ReplayDataset",
    "Samples",
    "TargetStore",
    "bytes_per_view",
    "center_view",
    "check_space",
    "damaged_shards",
    "dataset_fingerprint",
    "diagnostics",
    "draw_view",
    "export",
    "fingerprint",
    "logits_spec",
    "prepare_store",
    "reconstruct_topk",
    "render",
    "sha256_file",
    "summary",
    "teacher_record",
    "to_tensor",
    "view_params",
    "view_spec",
    "write_shard",
]
