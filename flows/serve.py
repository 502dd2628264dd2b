"""`grain serve`: register the deployments and serve them from this process (Prefect's `serve`).

`grain/full-pipeline` (flow `grain`) and one deployment per stage flow (`grain-ingest/ingest`, …). The config path
and the `--set` overrides given to `grain serve` become each deployment's default parameters ``config`` and
``base_overrides``; a run's own ``overrides`` parameter is applied on top of them, so
`prefect deployment run grain/full-pipeline --param 'overrides=["train.steps=40"]'` changes the step count and keeps
the served workdir. `prefect deployment run grain/full-pipeline --watch` runs the pipeline in a subprocess of this
server process.
"""

from __future__ import annotations

from prefect import serve

from grain.flows.pipeline import ALL_FLOWS


def deployment_parameters(config: str | None, base_overrides: list[str]) -> dict[str, object]:
    return {"config": config, "base_overrides": list(base_overrides), "overrides": []}


def serve_all(config: str | None, base_overrides: list[str], limit: int | None = None, only: list[str] | None = None) -> None:
    params = deployment_parameters(config, base_overrides)
    deployments = [
        fl.to_deployment(name=name, parameters=params, description=(fl.__doc__ or "").strip().split("\n")[0] or None,
                         tags=["grain"])
        for name, fl in ALL_FLOWS.items() if not only or name in only
    ]
    serve(*deployments, limit=limit)
