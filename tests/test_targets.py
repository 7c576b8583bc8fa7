"""The soft-target store: replayable views, exact export, resume after SIGKILL, 2 processes, refusal, reading."""
import json
import os
import shutil
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill import losses, store
from distill.data import Preprocess, load_splits, load_unlabeled
from distill.errors import DistillError
from distill.kd import teacher_probs
from distill.models import load_model, sha256_file
from distill.recipe import KDConfig, TargetsConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
RECIPE = "recipes/tiny-vit.yaml"
BASE = ["data.subset=400", "teacher.epochs=1", "targets.shard_size=64", "targets.views=3"]


def run(*args, check=True):
    r = subprocess.run(list(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def teach(out, *extra, check=True, launcher=("distill", "teach")):
    return run(*launcher, RECIPE, f"output_dir={out}", *BASE, *extra, check=check)


def fp16_tolerance(z: np.ndarray) -> np.ndarray:
    # float16 keeps 11 significant bits: rounding moves a value by at most half a unit in the last place
    return np.abs(z) * 2.0**-11 + 1e-6


def all_rows(reader):
    n, r = reader.num_samples, reader.rows_per_sample
    return reader.rows(np.repeat(np.arange(n), r), np.tile(np.arange(r), n))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny teacher, fine-tuned and exported once for the tests that only read."""
    out = tmp_path_factory.mktemp("store")
    teach(out)
    return out / "tiny-vit"


# --- views -------------------------------------------------------------------------
def test_views_are_deterministic_and_follow_the_spec():
    spec = TargetsConfig(views=8, scale=(0.25, 1.0), hflip=0.5)
    a = store.view_params(spec, 0, 17, 28, 40)
    assert np.array_equal(a, store.view_params(spec, 0, 17, 28, 40))  # any process draws the same
    assert not np.array_equal(a, store.view_params(spec, 1, 17, 28, 40))
    boxes = np.stack([store.draw_view(spec, 0, i, 0, 28, 40) for i in range(500)])
    assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert area.min() > 0.2 and area.max() <= 1.0  # scale (0.25, 1), up to pixel rounding
    assert 0.4 < boxes[:, 4].mean() < 0.6  # half flipped
    center = a[-1]
    assert np.allclose(center, [0, (40 - 28) / 2 / 40, 1, (40 + 28) / 2 / 40, 0])  # the shorter side, centred


def test_render_crops_the_same_pixels_for_every_model():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    spec = TargetsConfig(views=20)
    for p in store.view_params(spec, 3, 0, 37, 53):
        y0, x0 = round(p[0] * 37), round(p[1] * 53)
        y1, x1 = round(p[2] * 37), round(p[3] * 53)
        crop = image[y0:y1, x0:x1]
        crop = crop[:, ::-1] if p[4] else crop
        # rendered at the crop's own size there is no resampling: exactly the crop's pixels
        if y1 - y0 == x1 - x0:
            assert np.array_equal(store.render(image, p, y1 - y0, "bilinear"), crop)
        # any model size resamples that same crop
        big = store.render(image, p, 64, "bicubic")
        assert big.shape == (64, 64, 3) and big.dtype == np.uint8


def tail_stats(z: torch.Tensor, k: int):
    """(top-k, tail log-sum-exp, tail mean) of float32 logits [n, K], as the shard writer keeps them."""
    top = z.topk(k, -1)
    tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, top.indices, False)
    lse = z.masked_fill(~tail, -float("inf")).logsumexp(-1)
    mean = z.masked_fill(~tail, 0.0).sum(-1) / max(z.shape[1] - k, 1)
    return top, lse, mean, tail


def kl_at(p_logits, q_logits, t: float) -> torch.Tensor:
    lp, lq = (torch.as_tensor(x).double().div(t).log_softmax(-1) for x in (p_logits, q_logits))
    return (lp.exp() * (lp - lq)).sum(-1)


def test_topk_reconstruction_keeps_the_top_and_the_tails_mass_and_mean():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 100, generator=gen) * 3
    z[:100] += 12 * torch.nn.functional.one_hot(torch.randint(0, 100, (100,), generator=gen), 100)  # confident rows
    full_kl = {}
    for k in (1, 5, 20, 99, 100):
        top, lse, mean, tail = tail_stats(z, k)
        full_kl[k] = {}
        for t in (1.0, 4.0):
            rec = torch.from_numpy(store.reconstruct_topk(top.values.half().float().numpy(),
                                                          top.indices.short().numpy(), lse.numpy(), mean.numpy(), 100, t))
            assert torch.equal(rec.gather(1, top.indices), top.values.half().float())  # the kept logits, as stored
            assert torch.equal(rec.argmax(-1), z.argmax(-1))  # no tail class rises above a kept one
            assert (rec.masked_fill(~tail, -float("inf")).max(-1).values <= top.values.half().float()[:, -1]).all()
            if k < 100:
                rec_lse = rec.double().div(t).masked_fill(~tail, -float("inf")).logsumexp(-1)
                true_lse = z.double().div(t).masked_fill(~tail, -float("inf")).logsumexp(-1)
                if t == 1.0:  # the tail's mass is exact at T = 1 ...
                    assert torch.allclose(rec_lse, lse.double(), rtol=0, atol=2e-5)
                else:  # ... and close at T = 4: log of the mass within 0.2 (convexity bounds the interpolation)
                    assert (rec_lse - true_lse).abs().max() < 0.2, (k, (rec_lse - true_lse).abs().max())
            full_kl[k][t] = kl_at(z, rec, t)
        assert all((kl >= -1e-9).all() for kl in full_kl[k].values())
    assert full_kl[100][1.0].max() < 1e-5 and full_kl[100][4.0].max() < 1e-5  # everything kept: the logits
    # a larger k is closer to the full distribution, at T = 1 and at T = 4 (measured on these logits: k = 20
    # gives 0.055 and 0.10 nats, k = 99 below 1e-5)
    for t in (1.0, 4.0):
        means = [full_kl[k][t].mean().item() for k in (1, 5, 20, 99)]
        assert means == sorted(means, reverse=True), (t, means)
        assert means[2] < 0.2 and means[3] < 1e-4
    print({k: {t: round(v.mean().item(), 4) for t, v in kl.items()} for k, kl in full_kl.items()})


@pytest.mark.parametrize("true_tail", [1.9e-4, 5.4e-7])
def test_a_small_tail_comes_back_with_its_mass(tmp_path, true_tail):
    """The issue's examples: a confident 1000-class row, top-20 kept; the tail mass used to come back as 1e-12 (for
    1.9e-4) or 2.8e-3 (for 5.4e-7) from float16 top values against the log-sum-exp of all K."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1000, generator=gen)
    z[:, :20] += torch.linspace(12, 8, 20)  # the kept top 20
    z[:, 0] += 6.0
    tail = torch.ones(4, 1000, dtype=torch.bool)
    tail[:, :20] = False
    # shift the tail so its true mass (over the float32 logits) is `true_tail`
    mass = lambda x: (x.softmax(-1) * tail).sum(-1)
    for _ in range(50):
        m = mass(z).double()
        z = z + tail * (torch.log(torch.tensor(true_tail, dtype=torch.float64) / m) -
                        torch.log((1 - torch.tensor(true_tail, dtype=torch.float64)) / (1 - m))).float()[:, None]
    assert torch.allclose(mass(z).double(), torch.full((4,), true_tail, dtype=torch.float64), rtol=1e-3)
    reader = write_store(tmp_path, z, TargetsConfig(logits="topk", topk=20))
    got = reader.rows(np.arange(4), np.zeros(4, np.int64))["logits"]
    back = (torch.from_numpy(got).double().softmax(-1) * tail).sum(-1)
    print(f"true tail {true_tail:.2e}: back {back.tolist()}")
    assert torch.allclose(back, torch.full((4,), true_tail, dtype=torch.float64), rtol=0.03)


def write_store(out: Path, logits: torch.Tensor, spec: TargetsConfig, version=None) -> "store.TargetStore":
    """A complete one-view store of `logits` [n, K] (one row per sample), written by the exporter's shard writer."""
    n, num_classes = logits.shape
    spec_logits = store.logits_spec(spec, num_classes)
    out.mkdir(parents=True, exist_ok=True)
    store.write_shard(out, 0, 0, n, "test", {}, spec_logits, logits, torch.zeros(n, 5), torch.zeros(n))
    info = json.loads((out / "shard-00000.json").read_text())
    manifest = {"format": "distill-targets", "version": version or store.FORMAT_VERSION, "complete": True,
                "fingerprint": "test", "num_samples": n, "num_labeled": n, "num_unlabeled": 0, "views": 0,
                "rows_per_sample": 1, "center_view": 0, "shard_size": n, "num_classes": num_classes,
                "classes": [str(c) for c in range(num_classes)], "logits": spec_logits,
                "shards": [{"file": "shard-00000.safetensors", "first_sample": 0, "num_samples": n, "rows": n,
                            "sha256": info["sha256"]}]}
    (out / store.MANIFEST).write_text(json.dumps(manifest))
    return store.TargetStore(out) if version is None else None


def test_rows_carry_the_full_vectors_logit_mean_and_std(tmp_path):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(32, 50, generator=gen) * 4 + torch.randn(32, 1, generator=gen) * 10
    z[:, 3] += 300.0  # float16 rounds large logits by up to 0.125
    for storage in ("full", "topk"):
        reader = write_store(tmp_path / storage, z, TargetsConfig(logits=storage, topk=5))
        rows = reader.rows(np.arange(32), np.zeros(32, np.int64))
        assert rows["logit_mean"].dtype == np.float32 and rows["logit_std"].dtype == np.float32
        assert np.allclose(rows["logit_mean"], z.mean(-1).numpy(), rtol=1e-6, atol=1e-5)
        assert np.allclose(rows["logit_std"], z.std(-1).numpy(), rtol=1e-6)
        if storage == "full":  # what standardising the float16 row computed before, up to float16 rounding
            row, rounding = torch.from_numpy(rows["logits"]), z.abs() * 2.0**-11  # float16: 11 significant bits
            assert (np.abs(rows["logit_mean"] - row.mean(-1).numpy()) <= rounding.mean(-1).numpy() + 1e-6).all()
            # |std(a) - std(b)| <= std-norm of a - b <= its largest element · sqrt(n / (n - 1))
            assert (np.abs(rows["logit_std"] - row.std(-1).numpy()) <= rounding.max(-1).values.numpy() * 1.02).all()
        assert reader.manifest["logits"]["row_stats"] == {"logit_mean": "float32", "logit_std": "float32"}
    # kd.teacher_probs standardises a store batch with them: as the teacher's float32 vector, top-k or not
    kd = KDConfig(loss="kl", standardize=True)
    want = torch.softmax(losses.standardize(z) / 4.0, -1)
    for storage in ("full", "topk"):
        # read as a student at T = 4 with kd.standardize reads them (ReplayDataset): a top-k tail rebuilt for that
        rows = store.TargetStore(tmp_path / storage).rows(np.arange(32), np.zeros(32, np.int64), 4.0, True)
        batch = {key: torch.from_numpy(rows[key]) for key in ("logits", "logit_mean", "logit_std")}
        got = teacher_probs(batch, kd, 4.0)
        top = z.topk(5, -1).indices
        assert torch.allclose(got.gather(1, top), want.gather(1, top), rtol=2e-3, atol=1e-6), storage
    plain = teacher_probs(batch, KDConfig(loss="kl"), 4.0)  # without standardize: the stored logits at T
    assert torch.allclose(plain, torch.softmax(batch["logits"] / 4.0, -1))


def test_a_store_of_an_older_distill_is_refused_with_the_command_that_rebuilds_it(tmp_path, capsys):
    write_store(tmp_path / "targets", torch.randn(4, 10), TargetsConfig(logits="full"), version=1)
    with pytest.raises(DistillError, match=r"written by an older distill \(store format 1, this one reads 2.*"
                                           r"distill teach <recipe.yaml> --export-only --rebuild-targets"):
        store.TargetStore(tmp_path / "targets")
    # the exporter says the same before exporting over it (unless told to rebuild)
    with pytest.raises(DistillError, match="older distill"):
        store.prepare_store(tmp_path / "targets", "another fingerprint", False, {})
    from distill import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: targets:") and "older" in err, err
    assert store.prepare_store(tmp_path / "targets", "another fingerprint", True, {}) == "fresh"


def test_label_smoothing_signature():
    """A label-smoothed teacher's outputs (ceiling 1 - α + α/K, even tail) are flagged; a peaked one is not."""
    k, n = 10, 400
    labels = np.arange(n) % k
    rng = np.random.default_rng(0)

    def fake_store(probs):
        logits = np.log(probs).astype(np.float32)
        manifest = {"num_labeled": n, "center_view": 1}
        rows = lambda s, v: {"logits": logits[s], "label": labels[s]}
        return SimpleNamespace(manifest=manifest, num_classes=k, rows_per_sample=2, views=1, rows=rows)

    alpha = 0.1
    smooth = np.full((n, k), alpha / k)
    smooth[np.arange(n), labels] = 1 - alpha + alpha / k
    d = store.diagnostics(fake_store(smooth))
    assert d["label_smoothing_suspected"] and d["implied_alpha"] == pytest.approx(alpha, abs=1e-4)
    assert d["top1_center"] == 1.0

    peaked = rng.dirichlet(np.full(k, 0.1), n) * 0.002  # uneven tail ...
    peaked[np.arange(n), labels] = 0.998  # ... under a confident top class
    peaked /= peaked.sum(1, keepdims=True)
    d = store.diagnostics(fake_store(peaked))
    assert not d["label_smoothing_suspected"] and d["implied_alpha"] < 0.01


# --- export and replay ------------------------------------------------------------------
@pytest.mark.slow
def test_store_layout_and_manifest(run_dir):
    m = json.loads((run_dir / "targets" / "manifest.json").read_text())
    assert m["complete"] and m["num_samples"] == 400 and m["views"] == 3 and m["rows_per_sample"] == 4
    assert m["logits"] == {"storage": "full", "dtype": "float16",
                           "row_stats": {"logit_mean": "float32", "logit_std": "float32"}}
    assert m["version"] == store.FORMAT_VERSION == 2
    assert len(m["shards"]) == 7 and sum(s["num_samples"] for s in m["shards"]) == 400
    teacher_info = json.loads((run_dir / "teacher" / "model.json").read_text())
    assert m["teacher"]["sha256"] == teacher_info["sha256"]
    assert m["teacher"]["trained_with_label_smoothing"] is True  # the recipe fine-tunes with 0.1
    for key in ("top1_views", "top1_center", "mean_max_prob", "implied_alpha", "nontarget_uniformity",
                "label_smoothing_suspected"):
        assert key in m["diagnostics"]
    for s in m["shards"]:
        assert sha256_file(run_dir / "targets" / s["file"]) == s["sha256"]
    assert not list((run_dir / "targets").glob(".*tmp"))


@pytest.mark.slow
def test_replaying_a_view_reproduces_the_stored_logits(run_dir):
    reader = store.TargetStore(run_dir / "targets")
    model, pre, _ = load_model(run_dir / "teacher")
    recipe = load_recipe(ROOT / RECIPE, [f"output_dir={run_dir.parent}", *BASE])
    train, _ = load_splits(recipe.data)
    rng = np.random.default_rng(1)
    samples, views = rng.integers(0, 400, 64), rng.integers(0, 4, 64)
    rows = reader.rows(samples, views)
    pixels = np.stack([store.render(train.load(i), p, pre.input_size, pre.interpolation)
                       for i, p in zip(samples, rows["params"])])
    with torch.inference_mode():
        z = model.eval()(store.to_tensor(pixels, pre)).numpy()
    diff = np.abs(z - rows["logits"])
    print(f"replay: max |logit - stored| = {diff.max():.2e} over {len(samples)} random rows")
    assert (diff <= fp16_tolerance(z)).all(), diff.max()
    # the stored params are the ones the generator draws for (seed, sample, view)
    spec = recipe.targets
    for i, v, p in zip(samples, views, rows["params"]):
        image = train.load(i)
        expected = store.view_params(spec, recipe.seed, int(i), *image.shape[:2])[v]
        assert np.array_equal(p, expected)


@pytest.mark.slow
def test_replay_dataset_gives_the_student_the_teachers_view(run_dir):
    reader = store.TargetStore(run_dir / "targets")
    recipe = load_recipe(ROOT / RECIPE, [f"output_dir={run_dir.parent}", *BASE])
    train, _ = load_splits(recipe.data)
    student = Preprocess(input_size=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = store.ReplayDataset(reader, store.Samples(train), student, seed=0)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        seen.add(ds.view_of(5))
        x, label, cached = ds[5]
        row = reader.row(5, ds.view_of(5))
        assert x.shape == (3, 40, 40) and label == train.labels[5]
        assert torch.equal(cached["logits"], torch.from_numpy(row["logits"]))
        assert cached["logit_mean"].item() == row["logit_mean"] and cached["logit_std"].item() == row["logit_std"]
        expected = store.to_tensor(store.render(train.load(5), row["params"], 40, "bicubic"), student)
        assert torch.equal(x, expected)
    assert seen <= {0, 1, 2}  # random views only; the center view is for evaluation
    center = store.ReplayDataset(reader, store.Samples(train), student, view="center")
    assert center.view_of(7) == 3


@pytest.mark.slow
def test_reader_is_memory_mapped_and_reads_in_constant_memory(run_dir):
    reader = store.TargetStore(run_dir / "targets")
    assert all(isinstance(a, np.memmap) for a in reader._shard(0).values())
    tracemalloc.start()
    for lo in range(0, 400, 40):
        reader.rows(np.arange(lo, lo + 40), np.full(40, 2))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024  # a batch at a time, never the store (≈ 32 kB of logits per 400 samples)


@pytest.mark.slow
def test_inspect_prints_the_summary(run_dir):
    r = run("distill", "inspect", str(run_dir / "targets"))
    for text in ("complete", "samples      400", "1600 rows", "full float16",
                 "bytes/view", "teacher top1", "LS signature"):
        assert text in r.stdout, r.stdout
    assert run("distill", "inspect", str(run_dir)).stdout == r.stdout  # the run dir works too


# --- integrity ---------------------------------------------------------------------------
@pytest.mark.slow
def test_store_for_another_dataset_or_teacher_is_refused(tmp_path, run_dir):
    shutil.copytree(run_dir, tmp_path / "tiny-vit")
    r = teach(tmp_path, "data.subset=300", "--export-only", check=False)
    assert r.returncode == 2 and "error: targets:" in r.stderr and "another dataset" in r.stderr, r.stderr
    # re-fine-tuning over an existing store is refused before any training
    r = teach(tmp_path, "seed=1", check=False)
    assert r.returncode == 2 and "--rebuild-targets" in r.stderr and "epoch 1" not in r.stdout
    # a reader that expects another teacher refuses the store too
    reader = store.TargetStore(tmp_path / "tiny-vit" / "targets")
    with pytest.raises(DistillError, match="teacher.sha256"):
        reader.check({"teacher.sha256": "0" * 64})
    # the flag rebuilds it
    teach(tmp_path, "seed=1", "--rebuild-targets")
    r = teach(tmp_path, "seed=1", "--export-only")
    assert "complete and matches the teacher; nothing to export" in r.stdout


@pytest.mark.slow
def test_a_truncated_or_altered_shard_is_caught_and_exported_again(tmp_path, run_dir):
    shutil.copytree(run_dir, tmp_path / "tiny-vit")
    store_dir = tmp_path / "tiny-vit" / "targets"
    intact = all_rows(store.TargetStore(store_dir))
    store.TargetStore(store_dir).verify()
    shard1, shard4 = store_dir / "shard-00001.safetensors", store_dir / "shard-00004.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-100])  # truncated
    data = bytearray(shard4.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the logits: the file still parses
    shard4.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=r"shard-00001.safetensors is damaged .* and 1 more"):
        store.TargetStore(store_dir).verify()
    # learn refuses the store rather than train on it
    r = run("distill", "learn", RECIPE, f"output_dir={tmp_path}", *BASE, "students=[{name: s, model: 'timm:resnet10t', "
            "resolution: 28, epochs: 1}]", check=False)
    assert r.returncode == 2 and "error: targets:" in r.stderr and "damaged" in r.stderr, r.stderr[-2000:]
    # --export-only exports exactly the damaged shards again
    r = teach(tmp_path, "--export-only")
    assert "shard-00001.safetensors, shard-00004.safetensors damaged" in r.stdout, r.stdout[-2000:]
    reader = store.TargetStore(store_dir)
    reader.verify()
    assert reader.manifest["export"]["rows_exported_now"] == 2 * 64 * 4
    again = all_rows(reader)
    assert np.array_equal(again["params"], intact["params"])
    assert np.allclose(again["logits"], intact["logits"], rtol=2**-10, atol=1e-6)


@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_an_uninterrupted_export(tmp_path, run_dir):
    extra = ["data.unlabeled=rest", "data.unlabeled_subset=6000", "targets.shard_size=500"]
    for name in ("killed", "whole"):
        (tmp_path / name / "tiny-vit").mkdir(parents=True)
        shutil.copytree(run_dir / "teacher", tmp_path / name / "tiny-vit" / "teacher")
    cmd = ["distill", "teach", RECIPE, f"output_dir={tmp_path / 'killed'}", *BASE, *extra, "--export-only"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_dir = tmp_path / "killed" / "tiny-vit" / "targets"
    deadline = time.time() + 300
    while len(list(store_dir.glob("shard-*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(store_dir.glob("shard-*.json")))
    assert 3 <= done < 13 and not (store_dir / "manifest.json").exists(), done
    with pytest.raises(DistillError, match="no store"):
        store.TargetStore(store_dir)

    r = run(*cmd)
    assert "targets:" in r.stdout
    run("distill", "teach", RECIPE, f"output_dir={tmp_path / 'whole'}", *BASE, *extra, "--export-only")
    resumed = store.TargetStore(store_dir)
    whole = store.TargetStore(tmp_path / "whole" / "tiny-vit" / "targets")
    assert resumed.manifest["export"]["rows_exported_now"] < 6400 * 4  # the complete shards were kept
    assert resumed.manifest["num_unlabeled"] == 6000
    a, b = all_rows(resumed), all_rows(whole)
    assert np.array_equal(a["params"], b["params"]) and np.array_equal(a["label"], b["label"])
    assert np.allclose(a["logits"], b["logits"], rtol=2**-10, atol=1e-6)
    assert (a["label"][400 * 4:] == -1).all() and (a["label"][:400 * 4] >= 0).all()
    for s, t in zip(resumed.manifest["shards"], whole.manifest["shards"]):
        assert s["rows"] == t["rows"] and s["first_sample"] == t["first_sample"]


@pytest.mark.slow
def test_two_processes_write_every_row_once_and_match_one_process(tmp_path, run_dir):
    (tmp_path / "tiny-vit").mkdir()
    shutil.copytree(run_dir / "teacher", tmp_path / "tiny-vit" / "teacher")
    teach(tmp_path, "--export-only", launcher=("torchrun", "--nproc_per_node", "2", "distill/teach.py"))
    two = store.TargetStore(tmp_path / "tiny-vit" / "targets")
    one = store.TargetStore(run_dir / "targets")
    assert two.manifest["export"]["num_processes"] == 2 and two.manifest["fingerprint"] == one.manifest["fingerprint"]
    starts = [s["first_sample"] for s in two.manifest["shards"]]
    assert starts == sorted(set(starts)) and sum(s["num_samples"] for s in two.manifest["shards"]) == 400
    a, b = all_rows(two), all_rows(one)
    assert np.array_equal(a["params"], b["params"]) and np.array_equal(a["label"], b["label"])
    diff = np.abs(a["logits"] - b["logits"])
    print(f"2 processes vs 1: max |logit diff| = {diff.max():.2e}")
    assert (diff <= 2 * fp16_tolerance(b["logits"])).all()


def test_unlabeled_images_come_after_the_labeled_ones():
    recipe = load_recipe(ROOT / RECIPE, [*BASE, "data.unlabeled=rest", "data.unlabeled_subset=50"])
    train, val = load_splits(recipe.data)
    unlabeled = load_unlabeled(recipe.data, train, val)
    samples = store.Samples(train, unlabeled)
    assert len(samples) == 450 and samples.num_labeled == 400
    assert (samples.labels[400:] == -1).all()
    assert samples.describe(420).startswith("fashion-mnist:train")  # exported: the SIGKILL test


@pytest.mark.parametrize("storage", ["full", "topk"])
def test_bytes_per_view_is_what_a_shard_holds(tmp_path, storage):
    n, k = 512, 50
    reader = write_store(tmp_path, torch.randn(n, k), TargetsConfig(logits=storage, topk=5))
    per_view = store.bytes_per_view(reader.manifest["logits"], k)
    size = (tmp_path / "shard-00000.safetensors").stat().st_size
    # rows x bytes per view, plus the per-sample labels (int64) and the safetensors header
    assert n * per_view + 8 * n <= size <= n * per_view + 8 * n + 4096


def test_a_store_larger_than_the_free_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from distill.recipe import DataConfig

    train, _ = load_splits(DataConfig(source="digits"))
    samples = store.Samples(train.subset(np.arange(64)))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(len(train.classes)))
    pre = Preprocess(input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0)
    with pytest.raises(DistillError, match=r"targets: the store needs about .* MiB free; lower targets.views \(16\)"):
        store.export(model, pre, samples, train.classes, TargetsConfig(views=16), 0, tmp_path / "targets",
                     Accelerator(cpu=True), {"sha256": "x"}, progress=False)
    assert not (tmp_path / "targets").exists()
