"""`grain serve`: register the deployments and serve them from this process (Prefect's `serve`).

`grain/full-pipeline` (flow `grain`) and one deployment per stage flow (`grain-ingest/ingest`, …), all with the
given config path and overrides as default parameters; `prefect deployment run grain/full-pipeline --watch`
then runs the pipeline in a subprocess of this server process.
"""

from __future__ import annotations

from prefect import serve

from grain.flows.pipeline import ALL_FLOWS


def serve_all(config: str | None, overrides: list[str], limit: int | None = None, only: list[str] | None = None) -> None:
    params = {"config": config, "overrides": list(overrides)}
    deployments = [
        fl.to_deployment(name=name, parameters=params, description=(fl.__doc__ or "").strip().split("\n")[0] or None,
                         tags=["grain"])
        for name, fl in ALL_FLOWS.items() if not only or name in only
    ]
    serve(*deployments, limit=limit)
