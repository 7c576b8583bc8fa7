"""`distill inspect`: a store's summary, what it holds and what its diagnostics found."""
from __future__ import annotations

from distill.store.reader import TargetStore


def summary(path) -> str:
    """What `distill inspect <run>/targets` prints."""
    store = TargetStore(path, allow_incomplete=True)
    m, d = store.manifest, store.manifest.get("diagnostics", {})
    size = store.nbytes()
    rows = m["num_samples"] * m["rows_per_sample"]
    lines = [
        f"store        {store.path}  ({'complete' if m.get('complete') else 'INCOMPLETE'}, format {m['version']})",
        f"samples      {m['num_samples']} ({m['num_labeled']} labeled, {m['num_unlabeled']} unlabeled)",
        f"views        {m['views']} random + 1 center per sample = {rows} rows",
        f"classes      {m['num_classes']}",
        f"logits       {m['logits']['storage']} {m['logits']['dtype']}"
        + (f", k={m['logits']['k']} + the tail's log-sum-exp and mean ({m['logits']['tail']['spread']} spread)"
           if m["logits"]["storage"] == "topk" else "")
        + ("; per row " + ", ".join(f"{c} {t}" for c, t in m["logits"]["row_stats"].items())
           if "row_stats" in m["logits"] else ""),
        f"size         {size / 2**20:.2f} MiB in {len(m['shards'])} shard(s), {size / max(rows, 1):.1f} bytes/view",
        (f"teacher      {m['teacher'].get('model')} sha256 {m['teacher']['sha256'][:12]}…, "
         f"input {m['teacher'].get('input_size')} px, trained with label smoothing: "
         f"{m['teacher'].get('trained_with_label_smoothing')}"),
        (f"views spec   scale {m['view_spec']['scale']}, ratio {[round(r, 3) for r in m['view_spec']['ratio']]}, "
         f"hflip {m['view_spec']['hflip']}, center crop {m['view_spec']['center_crop_pct']}, "
         f"seed {m['view_spec']['seed']}"),
    ]
    if m["view_spec"].get("augment"):  # targets.augment, replayed from each view's seed
        lines.append("augment      " + ", ".join(
            a["name"] + "(" + ", ".join(f"{k}={v}" for k, v in a.items() if k != "name") + ")"
            for a in m["view_spec"]["augment"]))
    if m["view_spec"].get("mix"):  # targets.mix: each random view mixed with a partner view, labelled as mixed
        x = m["view_spec"]["mix"]
        lines.append(f"mix          exact: MixUp α {x['mixup_alpha']}, CutMix α {x['cutmix_alpha']}, prob {x['prob']}, "
                     f"switch {x['switch_prob']} (the teacher labelled each mixed view)")
    if d:
        lines += [
            (f"teacher top1 {d['top1_views']:.4f} on random views"
             f"{' (the larger share of a mix)' if m['view_spec'].get('mix') else ''}, "
             f"{d['top1_center']:.4f} on center views"),
            f"confidence   mean max-prob {_fmt(d['mean_max_prob'])}, p99 {d['max_prob_p99']:.4f}",
            (f"LS signature implied alpha {d['implied_alpha']:.3f}, pile-up under the ceiling "
             f"{_fmt(d.get('ceiling_pileup'))}, non-target uniformity {_fmt(d['nontarget_uniformity'])} -> "
             f"label smoothing suspected: {d['label_smoothing_suspected']}"),
        ]
    if m.get("export"):
        e = m["export"]
        lines.append(f"export       {e['views_per_sec']:.0f} views/s ({e['forward_views_per_sec']:.0f} views/s "
                     f"teacher forward alone), {e['num_processes']} process(es)")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
