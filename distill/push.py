"""Entry: upload a saved model folder to the Hugging Face Hub (`distill push`).

    distill push <model dir> <repo id> [--private]

The folder goes up as it is: model.safetensors, config.json (timm's, or transformers'), README.md (its model
card, refreshed from metrics.json first) and model.json. Then, from anywhere:
`timm.create_model("hf-hub:<repo id>", pretrained=True)`, `pipeline("image-classification", model="<repo id>")`.
The token is huggingface_hub's (`hf auth login` or HF_TOKEN). With HF_HUB_OFFLINE set nothing is sent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from distill.errors import DistillError, exit_on_error

# distill.models (torch, timm) and huggingface_hub are imported where needed, so --help is instant

# the files a loader of the pushed repo reads, per model.json `source`
NEEDS = {"timm": "config.json", "hf": "config.json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill push", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory written by distill (runs/<name>/teacher, "
                                 "runs/<name>/students/<student>[/fixres])")
    p.add_argument("repo_id", help="the Hub repository, <user or organisation>/<name>; created if missing")
    p.add_argument("--private", action="store_true", help="create the repository private")
    return p.parse_args(argv)


def check_folder(folder: Path) -> dict:
    """The folder's model.json, refused unless the folder is one model that timm or transformers can load."""
    from distill.models.folder import read_info

    info = read_info(folder / "model.json")  # a DistillError for a folder distill did not write
    if info["source"] == "ensemble":
        raise DistillError(f"{folder}: an ensemble's folder holds no weights of its own, only paths to its "
                           "members; push a member folder instead")
    if not (folder / "model.safetensors").is_file():
        raise DistillError(f"{folder}: no model.safetensors; re-run the stage that wrote it")
    needed = NEEDS.get(info["source"])
    if needed and not (folder / needed).is_file():
        raise DistillError(f"{folder}: no {needed} (saved by an older distill), so neither timm nor transformers "
                           "could load it from the Hub; re-run the stage that wrote it")
    return info


def offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    folder = Path(args.model)
    check_folder(folder)
    if offline():
        raise DistillError(f"push: HF_HUB_OFFLINE is set, so nothing can reach the Hub; unset it to push "
                           f"{folder} to {args.repo_id}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from distill.models.card import write_card
    from distill.models.common import first_line

    metrics = folder / "metrics.json"  # the card as of the latest metrics (older folders have none yet)
    write_card(folder, metrics=json.loads(metrics.read_text()) if metrics.is_file() else None, siblings=False)
    # the model's own files: not a student's fixres/ or a teacher's fold-<f>/ and last/ (models of their own),
    # nor save_model's hidden temporary files
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    api = HfApi(library_name="distill")
    try:
        repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, repo_type="model",
                                   commit_message=f"distill push {folder}", allow_patterns=files)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DistillError(f"push: {args.repo_id}: {first_line(e)}; check the repo id and your token "
                           "(hf auth login, or HF_TOKEN)") from None
    print(f"pushed {len(files)} files of {folder} to {repo.url} (commit {commit.oid[:12]})")


if __name__ == "__main__":
    main()
