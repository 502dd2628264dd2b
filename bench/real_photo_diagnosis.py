"""Why GRAIN does (not) win on the composite world: re-score the real-photo benchmark's trained models with the
descriptor pool as the only change.

A composite category's descriptors are the caption sentences of its stamps ("An Adelaide Rosella.", "A blackbird.",
…): *alternatives*, one of which names the object in the image, not attributes that all hold at once, as in the
synthetic world or DCLIP. Every mode of the evaluate stage averages a class's descriptors (`descriptors`: the mean
of their embeddings; `regions-*`: the mean over descriptors of their match), so a category with 35 species is
scored by its average species. This script keeps the models, images and texts of the benchmark and changes only
the pool, to the max over a class's descriptors (the class of the best-matching stamp sentence, as in CHiLS's
subclass max):

- `descriptors` (reported, mean) vs `descriptors-max`: the global image embedding against each stamp sentence;
- for models with region queries, `regions-max@0` (reported: per descriptor the best query, then the mean) vs
  `regions-anymax`: the best (query, descriptor) pair of each class.

It reads the benchmark's results JSON (the runs' model and eval folders), reuses the evaluate stage's embedding
cache (nothing is re-encoded when the benchmark ran here) and prints a Markdown table (mean ± std over seeds).

    .venv/bin/python bench/real_photo_diagnosis.py                      # docs/results/results-real.json
    .venv/bin/python bench/real_photo_diagnosis.py --results /tmp/diag/steps4000/results-real.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from grain.evaluate.science import load_bench
from grain.evaluate.datasets import load_image_folder
from grain.evaluate.descriptors import read_descriptor_json
from grain.evaluate.zeroshot import EmbeddingCache, TextEncoder, encode_images
from grain.stages import eval_cache_dir, model_key
from grain.train.model import load_model


def pooled_scores(image: torch.Tensor, region: torch.Tensor | None, per_class: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """[N, C] scores for each pool: global mean (the reported `descriptors` mode), global max, and for region models
    the reported region max (mean over descriptors of the best query) and the any-pair max."""
    out: dict[str, list[torch.Tensor]] = {"descriptors": [], "descriptors-max": [], "regions-max@0": [], "regions-anymax": []}
    for d in per_class:  # d: [K, D] normalised descriptor embeddings of one class
        mean = torch.nn.functional.normalize(d.mean(0), dim=-1)
        out["descriptors"].append(image @ mean)
        out["descriptors-max"].append((image @ d.T).max(-1).values)
        if region is not None:
            sims = torch.einsum("nqd,kd->nqk", region, d)  # [N, Q, K]
            out["regions-max@0"].append(sims.max(1).values.mean(-1))
            out["regions-anymax"].append(sims.amax((1, 2)))
    return {k: torch.stack(v, 1) for k, v in out.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="docs/results/results-real.json", help="results JSON of the real-photo benchmark")
    ap.add_argument("--datasets", default="seen,heldout", help="eval sets (names in the benchmark's config)")
    ap.add_argument("--set", dest="overrides", action="append", default=None,
                    help="the benchmark's --set overrides (default: those the results JSON recorded), e.g. world.out=…")
    ap.add_argument("--seeds", default=None, help="only these seeds (comma-separated)")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    wanted = args.datasets.split(",")
    bench = load_bench(results["bench"], results["quick"], args.overrides or results.get("extra") or [])
    datasets = [d for d in bench.config().evaluate.datasets
                if d.name in wanted and d.kind == "image_folder"]
    table: dict[tuple[str, str, str], list[float]] = {}
    for run in results["runs"]:
        if args.seeds and str(run["seed"]) not in args.seeds.split(","):
            continue
        model_dir = Path(run["run"]) / "model"
        model = load_model(model_dir, device="cpu")
        text = TextEncoder(model, "cpu")
        cache = EmbeddingCache(eval_cache_dir(Path(run["run"]).parents[1]), model_key(model_dir))
        for ds in datasets:
            data = load_image_folder(ds.path, name=ds.name)
            emb, _ = cache.get_or_compute(data.fingerprint, lambda data=data: encode_images(
                model, len(data.keys), data.load, batch_size=64, device="cpu", progress=False),
                required=("boxes",) if model.uses_decoder else ())
            descriptors = read_descriptor_json(ds.descriptors)
            per_class = [text(descriptors[c]) for c in data.classnames]
            labels = torch.as_tensor(data.labels)
            for pool, scores in pooled_scores(emb["image_embed"], emb.get("region_embed"), per_class).items():
                acc = (scores.argmax(1) == labels).float().mean().item()
                table.setdefault((run["model"], ds.name, pool), []).append(acc)
    pools = ["descriptors", "descriptors-max", "regions-max@0", "regions-anymax"]
    for dataset in wanted:
        print(f"\n{dataset}: top-1 % (mean ± std over seeds)\n")
        print("| model | " + " | ".join(f"`{p}`" for p in pools) + " |")
        print("|---|" + "---|" * len(pools))
        for model in results["models"]:
            cells = []
            for p in pools:
                v = table.get((model, dataset, p))
                cells.append("—" if not v else f"{100 * statistics.fmean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.1f}")
            print(f"| `{model}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
