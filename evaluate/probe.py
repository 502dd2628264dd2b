"""Zero-shot accuracy during training (``train.eval_every``): a small held-out evaluation every N steps.

The probe takes the first ``train.eval_images`` images of every dataset in ``evaluate.datasets`` (the synthetic
splits are rendered once into the workdir, as the evaluate stage does), encodes them with the model being trained
(no cache: the weights change) and scores them with the evaluate stage's own code (:func:`score_dataset`), at α = 0
for the region scorers. It returns flat ``{"zeroshot/<dataset>/<mode>": value}`` metrics (``<dataset>-swap`` for the swap task,
``<dataset>-retrieval`` for text→image R@1) that the training loop
logs to TensorBoard and metrics.jsonl — the accuracy-vs-step curves of the science benchmark, and what a user
watching a long run looks at to see whether grounding helps before it ends (as open_clip's ``--zeroshot-frequency``).

The probe runs in eval mode under ``torch.no_grad`` and draws no random numbers, so a run with it gives the same
weights as a run without it (and resumes bit-exactly).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _head(data: Any, n: int) -> Any:
    """The first ``n`` images of a dataset (same loader: index i < n means the same image)."""
    if len(data.keys) <= n:
        return data
    fields = {"keys": data.keys[:n], "fingerprint": f"{data.fingerprint}:head{n}"}
    if hasattr(data, "classnames"):
        fields["labels"] = data.labels[:n]
        if getattr(data, "swap", None):
            fields["swap"] = data.swap[:n]
    else:
        fields["captions"] = data.captions[:n]
    return dataclasses.replace(data, **fields)


class ZeroShotProbe:
    """``probe(model) -> {"zeroshot/<dataset>/<mode>": value}`` on the first ``images`` images of each dataset."""

    def __init__(self, cfg: Any, workdir: str | Path, images: int, progress: bool = False) -> None:
        from grain.evaluate.run import load_dataset

        ecfg = cfg.evaluate
        self.cfg = ecfg.model_copy(update={"alphas": [0.0], "modes": [m for m in ecfg.modes if m != "waffle"]})
        self.sets: list[tuple[str, Any, Any, str]] = []
        for ds in ecfg.datasets:
            sets, descriptors = load_dataset(ds, cfg.ingest.synthetic, Path(workdir), progress)
            self.sets += [(ds.name, _head(d, images), descriptors, ds.descriptors or f"{ds.name} descriptors")
                          for d in sets]

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        from grain.evaluate.run import HEADLINE_METRIC, score_dataset
        from grain.evaluate.zeroshot import TextEncoder, encode_images

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            text = TextEncoder(model, device)
            out: dict[str, float] = {}
            for name, data, descriptors, where in self.sets:
                emb = encode_images(model, len(data.keys), data.load, batch_size=self.cfg.batch_size, device=device,
                                    desc=name, keys=data.keys)
                scored = score_dataset(self.cfg, model, text, data, emb, descriptors, where)
                scored.pop("skipped")
                for (task, mode), metrics in scored.items():
                    where = name if task == "classification" else f"{name}-{task}"  # swap task: <name>-swap
                    out[f"zeroshot/{where}/{mode}"] = float(metrics[HEADLINE_METRIC[task]])
            return out
        finally:
            model.train(was_training)
