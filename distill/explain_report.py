"""The output of `distill explain`: Grad-CAM overlays in rows and a grid, as PNGs, explain.json and TensorBoard."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ALPHA = 0.5  # weight of the heat map in an overlay


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """An H x W x 3 uint8 image with the map drawn over it in the jet colour map (red = most evidence)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3] * 255
    return np.round((1 - alpha) * image + alpha * heat).astype(np.uint8)


def render_row(panels: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """Panels side by side, each under its caption, as one H x W x 3 uint8 image (the same size for every row
    with the same number of panels, so rows stack into a grid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), dpi=100, squeeze=False)
    for ax, panel, caption in zip(axes[0], panels, captions):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


def caption(role: str, prediction: dict) -> str:
    text = f"{role}\n{prediction['predicted']} {prediction['confidence']:.0%}"
    if prediction["cam_class"] != prediction["predicted"]:
        text += f"\nmap for {prediction['cam_class']}"
    return text


def captions_table(records: list[dict], roles: list[str]) -> str:
    """The captions as a markdown table, for TensorBoard's text tab."""
    lines = ["| image | path | label | " + " | ".join(roles) + " |", "|---" * (3 + len(roles)) + "|"]
    for r in records:
        cells = [f"{r['models'][role]['predicted']} ({r['models'][role]['confidence']:.2f})" for role in roles]
        lines.append(f"| {r['index']} | {r['path']} | {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_rows(indices: list[int], val, results: dict, infos: dict, cam_class: str) -> tuple[list[dict], list]:
    """Per image, its explain.json record and its rendered row: the teacher's eval crop, then each model's overlay."""
    records, rows = [], []
    for n, index in enumerate(indices):
        label = int(val.labels[index])
        record = {"index": index, "path": val.describe(index), "label": val.classes[label],
                  "png": f"val{index:05d}.png", "models": {}}
        panels = [results["teacher"]["view"][n]]
        texts = [f"#{index} {record['label']}\n(as the teacher sees it)"]
        for role, info in infos.items():
            probs = results[role]["probs"][n]
            predicted = int(probs.argmax())
            explained = label if cam_class == "label" else predicted
            record["models"][role] = {"predicted": info["classes"][predicted], "confidence": float(probs[predicted]),
                                      "cam_class": info["classes"][explained],
                                      "cam_class_probability": float(probs[explained])}
            panels.append(overlay(results[role]["view"][n], results[role]["cam"][n]))
            texts.append(caption(role, record["models"][role]))
        records.append(record)
        rows.append(render_row(panels, texts))
    return records, rows


def write_outputs(out: Path, tb_dir: Path, rows: list[np.ndarray], summary: dict, roles: list[str]) -> None:
    """val<index>.png per image, grid.png, explain.json, and the same images + captions to TensorBoard."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from distill.runs import write_json

    out.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate(rows, axis=0)
    for record, row in zip(summary["images"], rows):
        Image.fromarray(row).save(out / record["png"])
    Image.fromarray(grid).save(out / "grid.png")
    write_json(out / "explain.json", summary)
    writer = SummaryWriter(str(tb_dir))
    writer.add_text("explain/captions", captions_table(summary["images"], roles))
    for record, row in zip(summary["images"], rows):
        writer.add_image(f"explain/val{record['index']:05d}", row, dataformats="HWC")
    writer.add_image("explain/grid", grid, dataformats="HWC")
    writer.close()
