"""evaluate(): metrics agree with scikit-learn and direct formulas."""
import numpy as np
import torch
from accelerate import Accelerator
from sklearn.metrics import confusion_matrix, f1_score, log_loss, recall_score
from torch.utils.data import DataLoader, TensorDataset

from distill.evaluate import classification_metrics, evaluate


def test_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 6, generator=g)
    labels = torch.randint(0, 6, (300,), generator=g)
    logits[torch.arange(150), labels[:150]] += 3  # half the samples made right
    m = classification_metrics(logits, labels, 6)
    pred = logits.argmax(1).numpy()
    assert np.isclose(m["top1"], (pred == labels.numpy()).mean())
    assert np.isclose(m["macro_f1"], f1_score(labels, pred, average="macro"))
    assert np.isclose(m["nll"], log_loss(labels, logits.softmax(1).numpy(), labels=range(6)), atol=1e-5)
    assert np.allclose(m["per_class_recall"], recall_score(labels, pred, average=None))
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=range(6)).tolist()
    top5 = logits.topk(5, 1).indices.eq(labels[:, None]).any(1).float().mean().item()
    assert np.isclose(m["top5"], top5) and m["top5"] >= m["top1"]


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    # 10 samples at confidence ~1.0 and all right: ECE ≈ 0; all wrong: ECE ≈ 1
    logits = torch.tensor([[20.0, 0.0]] * 10)
    assert classification_metrics(logits, torch.zeros(10, dtype=torch.long), 2)["ece"] < 1e-6
    assert classification_metrics(logits, torch.ones(10, dtype=torch.long), 2)["ece"] > 0.999


def test_evaluate_counts_every_sample_once():
    # 103 samples in batches of 10: the last batch is short; every sample must be counted exactly once
    x = torch.randn(103, 4)
    y = torch.randint(0, 3, (103,))
    model = torch.nn.Linear(4, 3)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=10))
    m = evaluate(accelerator.prepare(model), loader, accelerator, 3)
    assert m["num_images"] == 103 and sum(map(sum, m["confusion_matrix"])) == 103
    assert np.isclose(m["top1"], (model(x).argmax(1) == y).float().mean().item())


def test_macro_f1_is_over_the_classes_present_in_the_labels():
    # 3 classes, validation has images of classes 0 and 1 only; some predictions are class 2
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    pred = torch.tensor([0, 2, 0, 1, 1, 2])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 3).float() * 5, labels, 3)
    assert m["macro_f1_classes"] == 2
    assert np.isclose(m["macro_f1"], f1_score(labels, pred, labels=[0, 1], average="macro"))
    assert m["macro_f1"] > f1_score(labels, pred, average="macro")  # sklearn's default counts class 2 as F1 = 0
    assert m["per_class_recall"][2] is None


def test_macro_f1_with_every_class_present_is_sklearns():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    pred = torch.tensor([0, 1, 1, 0, 2, 2])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 3).float(), labels, 3)
    assert m["macro_f1_classes"] == 3 and np.isclose(m["macro_f1"], f1_score(labels, pred, average="macro"))
