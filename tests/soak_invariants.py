"""The promises the soak (tests/dags/soak.py) checks once every batch has run.

Each check returns ``(held, detail)``; ``detail`` says what was counted, or what broke.
``soak`` is the test's record of the run: the topology, the artifact store, the batches
announced (name -> file, encoding and monitor runs, review choice) and the trainings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

# What atomic writers and killed tasks leave behind: staging folders (encode, parts),
# temporary files of atomic writes, replaced outputs, pretraining checkpoints.
LEFTOVER = re.compile(r"(\.staging$|^_staging-|\.tmp$|\.old$|\.ckpt$)")


def _client(topo):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=topo.mlflow_url, registry_uri=topo.mlflow_url)


def _manifests(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p.parent, json.loads(p.read_text()))
        for p in sorted(root.glob("encodings/*/v*/*/_manifest.json"))
    ]


def encoded_once(soak) -> tuple[bool, str]:
    """One manifest per (batch, model version), whole outputs, and one encoding run that
    encoded it; the re-sent file encoded nothing new and the malformed one nothing at all."""
    import pandas as pd

    from sae_pipeline.steps.encoding import read_output, read_quarantine

    by_file = {str(b["path"]): name for name, b in soak.batches.items() if name != "resent"}
    seen: Counter[tuple[str, str]] = Counter()
    problems = []
    for folder, m in _manifests(soak.root):
        names = {by_file.get(f, f) for f in m["batch_files"]}
        name = "+".join(sorted(names))
        seen[(name, m["model_version"])] += 1
        rows = len(pd.read_parquet(m["batch_files"][0])) if len(m["batch_files"]) == 1 else None
        out, quarantined = read_output(str(folder)), read_quarantine(str(folder))
        entries = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        expected = {"_manifest.json", *m["parts"], *m["quarantine"]}
        if (m["rows_in"], m["rows_encoded"] + m["rows_quarantined"]) != (rows, rows):
            problems.append(f"{name}: rows {m['rows_in']} in, file has {rows}")
        if (len(out), len(quarantined)) != (m["rows_encoded"], m["rows_quarantined"]):
            problems.append(f"{name}: {len(out)} rows read back, manifest {m['rows_encoded']}")
        if entries != expected:
            problems.append(f"{name}: files {sorted(entries ^ expected)} differ from manifest")
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
        problems.append(f"more than one manifest for {twice}")
    for name, b in soak.batches.items():
        encoding_runs = [r for r, did in b["encoded_by"].items() if did]
        want = 0 if name in ("resent", "malformed") else 1  # resent: the clean batch's file
        if len(encoding_runs) != want:
            problems.append(f"{name}: encoded by {len(encoding_runs)} run(s) {encoding_runs}")
    if any(k[0] == "malformed" for k in seen):
        problems.append("the malformed batch has an output")
    detail = f"{sum(seen.values())} manifests over {len(soak.batches)} batches"
    return not problems, "; ".join(problems) or detail


def judged_once(soak) -> tuple[bool, str]:
    """One check run in MLflow and one decision file per (batch, champion version)."""
    client = _client(soak.topo)
    exp = client.get_experiment_by_name("sae-monitoring")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    runs_per = Counter(
        (r.data.tags.get("sae.batch"), r.data.tags.get("sae.model_version")) for r in runs
    )
    decisions = Counter(
        (p.parent.name, p.name.rsplit("-p", 1)[0])
        for p in soak.root.glob("monitoring/decisions/*/v*/*.json")
    )
    problems = [f"check runs {k}: {n}" for k, n in runs_per.items() if n != 1]
    problems += [f"decision files {k}: {n}" for k, n in decisions.items() if n != 1]
    if len(runs_per) != len(decisions):
        problems.append(
            f"{len(runs_per)} judged (batch, version) pairs but {len(decisions)} decisions"
        )
    detail = f"{len(runs)} check runs, {sum(decisions.values())} decision files"
    return not problems, "; ".join(problems) or detail


def versions_match_trainings(soak) -> tuple[bool, str]:
    """The registered versions are the trainings that reached ``register``, once each."""
    reached = sorted(soak.trainings_registered)
    problems = []
    for name in (soak.encoder_name, soak.scaler_name):
        versions = soak.topo.model_versions(name)
        runs = sorted(
            next((t["value"] for t in v.get("tags", []) if t["key"] == "sae.dag_run_id"), "?")
            for v in versions
        )
        if runs != reached:
            problems.append(f"{name}: versions from {runs}, trainings {reached}")
    detail = f"{len(reached)} trainings reached register; {len(reached)} versions of each model"
    return not problems, "; ".join(problems) or detail


def champions_agree(soak) -> tuple[bool, str]:
    client = _client(soak.topo)
    enc = client.get_model_version_by_alias(soak.encoder_name, "champion")
    sc = client.get_model_version_by_alias(soak.scaler_name, "champion")
    held = enc.run_id == sc.run_id
    return held, f"encoder v{enc.version}, scaler v{sc.version}, run {enc.run_id[:8]}" + (
        "" if held else f" != {sc.run_id[:8]}"
    )


def no_run_left_running(soak) -> tuple[bool, str]:
    client = _client(soak.topo)
    exps = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(exps, filter_string="attributes.status = 'RUNNING'")
    total = len(client.search_runs(exps, max_results=1000))
    names = [f"{r.info.run_name} ({r.info.run_id[:8]})" for r in running]
    return (
        not running,
        f"{len(running)} of {total} runs RUNNING {names}"
        if running
        else f"0 of {total} runs RUNNING",
    )


def no_leftovers(soak) -> tuple[bool, str]:
    """Nothing a writer stages or a killed task leaves in the artifact store or MLflow's."""
    found = [
        str(p.relative_to(base))
        for base in (soak.root, soak.topo.mlflow_artifacts)
        for p in base.rglob("*")
        if LEFTOVER.search(p.name)
    ]
    return (
        not found,
        f"left: {found[:10]}" if found else "no staging, temporary or checkpoint files",
    )


def same_codes(soak) -> tuple[bool, str]:
    """The held-out batch's codes from batch encoding = a fresh ``load_model`` on the champion."""
    import mlflow
    import numpy as np
    import pandas as pd

    from sae_pipeline.steps.encoding import read_output

    version = _client(soak.topo).get_model_version_by_alias(soak.encoder_name, "champion").version
    heldout = [str(soak.batches["heldout"]["path"])]
    outputs = [
        f
        for f, m in _manifests(soak.root)
        if m["batch_files"] == heldout and m["model_version"] == version
    ]
    if len(outputs) != 1:
        return False, f"{len(outputs)} encodings of the held-out batch by v{version}"
    encoded = read_output(str(outputs[0]))
    frame = pd.read_parquet(soak.batches["heldout"]["path"])
    model = mlflow.pyfunc.load_model(f"models:/{soak.encoder_name}@champion")
    fresh = model.predict(frame[soak.features])
    codes = [c for c in fresh.columns if c.startswith("code_")]
    got = encoded.sort_values("row")[codes].to_numpy()
    diff = float(np.abs(got - fresh[codes].to_numpy()).max())
    return diff <= 1e-5, f"v{version}, {len(frame)} rows, {len(codes)} codes, max |diff| {diff:.1e}"


def reviews_recorded(soak) -> tuple[bool, str]:
    """Each review's choice and reviewer, on the check run, in the decision file, and (retrain)
    on the retrained version; an accepted file for the accepted batch only."""
    client = _client(soak.topo)
    exp = client.get_experiment_by_name("sae-monitoring")
    problems, checked = [], 0
    accepted = list(soak.root.glob("monitoring/accepted/*/v*/*.json"))
    for name, b in soak.batches.items():
        if not b.get("choice"):
            continue
        checked += 1
        found = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`sae.dag_run_id` = '{b['monitor_run']}'"
        )
        tags = found[0].data.tags if len(found) == 1 else {}
        got = (tags.get("sae.review.choice"), tags.get("sae.review.by"))
        if got != (b["choice"], "reviewer"):
            problems.append(f"{name}: check run says {got}, decided {b['choice']} by reviewer")
        decision = [
            json.loads(p.read_text()) for p in soak.root.glob("monitoring/decisions/*/v*/*.json")
        ]
        mine = [
            d
            for d in decision
            if d["summary"].get("mlflow_run_id") == (found[0].info.run_id if found else None)
        ]
        review = (mine[0]["summary"].get("review") or {}) if len(mine) == 1 else {}
        if review.get("choice") != b["choice"]:
            problems.append(f"{name}: decision file records {review.get('choice')}")
    if [json.loads(p.read_text())["batch"]["files"] for p in accepted] != [
        [str(soak.batches["accepted"]["path"])]
    ]:
        problems.append(f"accepted files: {[p.name for p in accepted]}")
    for run_id in soak.trainings_registered:
        if run_id.startswith("drift__"):
            for v in soak.topo.model_versions(soak.encoder_name):
                tags = {t["key"]: t["value"] for t in v.get("tags", [])}
                if (
                    tags.get("sae.dag_run_id") == run_id
                    and tags.get("sae.review.choice") != "retrain"
                ):
                    problems.append(f"v{v['version']} review tags {tags.get('sae.review.choice')}")
    return not problems, "; ".join(problems) or f"{checked} reviews, {len(accepted)} accepted file"


INVARIANTS = {
    "every batch encoded once: one manifest, whole outputs": encoded_once,
    "every batch judged once per champion version": judged_once,
    "registered versions = trainings that reached register": versions_match_trainings,
    "encoder and scaler @champion from one run": champions_agree,
    "no MLflow run left RUNNING": no_run_left_running,
    "no staging or temporary files left": no_leftovers,
    "held-out codes: batch encoding = fresh load_model": same_codes,
    "review records match the decisions": reviews_recorded,
}


def check_all(soak) -> list[tuple[str, bool, str]]:
    rows = []
    for name, check in INVARIANTS.items():
        try:
            held, detail = check(soak)
        except Exception as err:  # a check that cannot run has not held
            held, detail = False, f"{type(err).__name__}: {err}"[:300]
        rows.append((name, held, detail))
    return rows
