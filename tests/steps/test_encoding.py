"""Batch encoding: planning, streaming, quarantine, atomic commit, and the DAG's wiring."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_pipeline.data import batches
from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import fit_scaler
from sae_pipeline.engine import batch_encoding
from sae_pipeline.engine.encoder import Encoder
from sae_pipeline.engine.net import Architecture, build_net
from sae_pipeline.errors import DataError, SaePipelineError
from sae_pipeline.steps import encoding
from sae_pipeline.steps.batch_context import batch_context

REPO = Path(__file__).resolve().parents[2]
FEATURES = [f"x{i}" for i in range(6)]


@pytest.fixture(scope="module")
def encoder():
    rng = np.random.default_rng(0)
    contract = Contract(FEATURES, dict.fromkeys(FEATURES, "float64"), None, "id")
    scaler = fit_scaler("minmax", rng.normal(size=(200, len(FEATURES))))
    return Encoder(contract, scaler, build_net(Architecture(len(FEATURES), [5, 3]), seed=0))


def frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = pd.DataFrame(rng.normal(size=(n, len(FEATURES))).astype(np.float32), columns=FEATURES)
    out.insert(0, "id", [f"r{i}" for i in range(n)])
    return out


def write(path: Path, data: pd.DataFrame, row_group: int) -> str:
    pq.write_table(pa.Table.from_pandas(data, preserve_index=False), path, row_group_size=row_group)
    return str(path)


def test_plan_cuts_whole_row_groups_and_numbers_rows_across_files(tmp_path):
    a = write(tmp_path / "a.parquet", frame(450), 100)
    b = write(tmp_path / "b.parquet", frame(120), 100)
    shards = batch_encoding.plan(batches.list_files(str(tmp_path)), shard_rows=250)
    got = [(Path(s["file"]).name, s["row_groups"], s["first_row"], s["rows"]) for s in shards]
    assert got == [
        ("a.parquet", [0, 1], 0, 200),
        ("a.parquet", [2, 3, 4], 200, 250),
        ("b.parquet", [0, 1], 450, 120),
    ]
    assert [s["index"] for s in shards] == [0, 1, 2]
    assert batches.list_files([a, b]) == [a, b]


def test_shards_stream_in_chunks_and_match_the_encoder(tmp_path, encoder):
    data = frame(530)
    data.loc[7, "x1"] = np.nan
    data.loc[8, "x4"] = -np.inf
    table = pa.Table.from_pandas(data, preserve_index=False)
    # A null (not NaN) is missing too.
    x5 = pa.array([None if i == 500 else v for i, v in enumerate(data["x5"].tolist())])
    table = table.set_column(table.schema.get_field_index("x5"), "x5", x5.cast(pa.float32()))
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=128)
    files = batches.list_files(str(tmp_path / "in.parquet"))
    seen = []
    results = [
        batch_encoding.encode_shard(
            encoder, s, str(tmp_path / f"out/{s['index']}.parquet"),
            str(tmp_path / f"q/{s['index']}.parquet"), id_column="id", chunk_rows=50,
            on_rows=seen.append,
        )
        for s in batch_encoding.plan(files, shard_rows=256)
    ]  # fmt: skip
    assert sum(r["rows_in"] for r in results) == sum(seen) == 530
    assert sum(r["rows_quarantined"] for r in results) == 3
    assert max(seen) == 50  # fixed-size chunks, never a whole shard
    out = pd.concat([pd.read_parquet(r["part"]) for r in results], ignore_index=True)
    keep = data.drop(index=[7, 8, 500])
    assert out["row"].tolist() == keep.index.tolist()
    assert out["id"].tolist() == keep["id"].tolist()
    expected = encoder.transform(keep, output="all")
    np.testing.assert_allclose(out[encoder.code_columns], expected[encoder.code_columns], rtol=1e-5)
    np.testing.assert_allclose(
        out["reconstruction_error"], expected["reconstruction_error"], rtol=1e-4, atol=1e-8
    )
    quarantined = pd.concat([pd.read_parquet(r["quarantine"]) for r in results if r["quarantine"]])
    reasons = dict(zip(quarantined["_row"], quarantined["_quarantine_reason"], strict=True))
    assert reasons == {
        7: "column 'x1': missing value",
        8: "column 'x4': infinite value -inf",
        500: "column 'x5': missing value",
    }
    assert quarantined["id"].tolist() == ["r7", "r8", "r500"]


def test_batch_is_checked_against_the_contract_before_anything_runs(tmp_path, encoder):
    missing = write(tmp_path / "missing.parquet", frame(20).drop(columns=["x3", "x5"]), 10)
    with pytest.raises(DataError, match=r"lacks feature column\(s\).*: x3, x5"):
        batches.inspect_batch([missing], encoder.contract)
    text = frame(20).astype({"x2": str})
    bad = write(tmp_path / "text.parquet", text, 10)
    with pytest.raises(DataError, match=r"column 'x2' .* is string, not numeric"):
        batches.inspect_batch([bad], encoder.contract)
    (tmp_path / "b.csv").write_text("x0\n1\n")
    with pytest.raises(DataError, match="is not Parquet"):
        batches.list_files(str(tmp_path / "b.csv"))
    with pytest.raises(DataError, match="batch not found"):
        batches.list_files(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"Parquet .*junk.parquet cannot be read"):
        batches.inspect_batch([str(tmp_path / "junk.parquet")], encoder.contract)
    info = batches.inspect_batch([write(tmp_path / "ok.parquet", frame(30), 10)], encoder.contract)
    assert info["rows"] == 30
    assert info["key"] == batches.batch_key(info["files"], [30])  # stable for the same files


def test_batch_paths_come_from_asset_events():
    events = {
        "sae_new_batches": [
            SimpleNamespace(extra={"path": "s3://landing/a.parquet"}),
            SimpleNamespace(extra={"path": ["/b.parquet", "/c.parquet"]}),
            SimpleNamespace(extra={"note": "no path"}, asset=SimpleNamespace(uri="sae://x")),
        ]
    }
    assert batches.sources_from_events(events) == [
        "s3://landing/a.parquet", "/b.parquet", "/c.parquet",
    ]  # fmt: skip
    assert batches.sources_from_events(None) == []


def test_prefetch_keeps_order_and_reraises_errors():
    assert list(batches.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        list(batches.prefetch(broken()))


def test_commit_publishes_at_once_checks_counts_and_is_idempotent(tmp_path, encoder, monkeypatch):
    from sae_pipeline.registry import champion

    monkeypatch.setattr(champion, "load_encoder", lambda ref: encoder)
    src = write(tmp_path / "batch.parquet", frame(300), 64)
    info = batches.inspect_batch([src], encoder.contract)
    ctx = {
        "run_id": "manual__1",
        "run_key": "manual__1",
        "artifacts_root": str(tmp_path / "store"),
        "model": {"name": "enc", "version": "3", "mlflow_run_id": "r", "run_key": "k",
                  "tracking_uri": "sqlite://", "artifacts_root": str(tmp_path / "store")},
        "batch": info,
    }  # fmt: skip
    ctx = encoding.prepare(ctx, shard_rows=128)
    out = Path(ctx["output"])
    assert out == tmp_path / "store/encodings/enc/v3" / info["key"]
    shards = encoding.plan_step(ctx)
    results = [encoding.encode_shard_step(ctx, s) for s in shards]
    assert not out.exists()  # nothing visible before commit
    with pytest.raises(DataError, match="but the batch has 300"):
        encoding.commit_step(ctx, results[:-1])
    assert not out.exists()
    manifest = encoding.commit_step(ctx, results)
    assert manifest["rows_in"] == manifest["rows_encoded"] == 300
    assert sorted(p.name for p in out.iterdir()) == [
        "_manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
    ]  # fmt: skip
    assert not Path(ctx["staging"]).exists()
    assert len(pd.read_parquet(out)) == 300  # readable as a Parquet dataset as it stands
    assert len(encoding.read_output(str(out))) == 300
    # The same batch with the same version again: nothing to plan, the same manifest.
    again = encoding.prepare({**ctx, "run_id": "manual__2", "run_key": "manual__2"})
    assert encoding.plan_step(again) == []
    assert encoding.commit_step(again, []) == manifest
    assert encoding.asset_extra(manifest)["path"] == str(out)


def test_encoding_dag_wiring():
    spec = importlib.util.spec_from_file_location("_t_enc", REPO / "dags/sae_batch_encoding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.encoding_dag
    assert set(dag.task_ids) == {"prepare", "plan", "encode_shard", "commit"}
    assert dag.get_task("plan").downstream_task_ids == {"encode_shard"}
    assert dag.get_task("encode_shard").downstream_task_ids == {"commit"}
    assert [a.uri for a in dag.get_task("commit").outlets] == ["sae://batches/encoded"]
    assert dag.get_task("commit").trigger_rule == "none_failed"
    assert "sae://batches/new" in str(dag.timetable.asset_condition)


def test_no_batch_anywhere_is_its_own_error(tmp_path):
    params = {"artifacts_root": str(tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    with pytest.raises(batches.NoBatch, match="no batch to process"):
        batch_context("scheduled__1", params, events={}, latest=[])


# ---- data safety (issue 14) -------------------------------------------------------------------
MODEL = {"name": "enc", "version": "3", "mlflow_run_id": "r", "run_key": "k",
         "tracking_uri": "sqlite://"}  # fmt: skip


@pytest.fixture
def use_encoder(encoder, monkeypatch):
    """Steps load this encoder instead of asking the registry."""
    from sae_pipeline.registry import champion

    monkeypatch.setattr(champion, "load_encoder", lambda ref: encoder)
    return encoder


def make_ctx(root: Path, files: list[str], contract, run_id: str = "manual__1") -> dict:
    """What ``batch_context`` gives a run: the batch inspected, the model pinned."""
    from sae_pipeline import storage

    return {
        "run_id": run_id,
        "run_key": storage.run_key(run_id),
        "artifacts_root": str(root / "store"),
        "model": {**MODEL, "artifacts_root": str(root / "store")},
        "batch": batches.inspect_batch(files, contract),
    }


def run_encode(ctx: dict, output: str | None = None, **sizes) -> dict:
    return encoding.encode_batch(encoding.prepare(ctx, output, **sizes))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from sae_pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_encode_refuses_a_folder_it_did_not_write(tmp_path, use_encoder, monkeypatch):
    src = write(tmp_path / "b.parquet", frame(50), 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("precious")
    ctx = make_ctx(tmp_path, [src], use_encoder.contract)
    with pytest.raises(DataError, match=r"did not write.*my_notes\.txt"):
        encoding.prepare(ctx, str(out))
    # The CLI: one line, exit 2, the folder as it was.
    monkeypatch.setattr(
        "sae_pipeline.steps.batch_context.batch_context", lambda *a, **k: ctx, raising=True
    )
    rc, _, err = run_cli(["encode", "--batch", src, "--output", str(out), "-q"])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "my_notes.txt" in err
    assert tree(out) == {"my_notes.txt": b"precious"}


def test_encode_refuses_the_current_folder_and_the_batch_folder(tmp_path, use_encoder, monkeypatch):
    folder = tmp_path / "landing"
    folder.mkdir()
    src = write(folder / "b.parquet", frame(50), 20)
    ctx = make_ctx(tmp_path, [src], use_encoder.contract)
    before = tree(tmp_path)
    with pytest.raises(DataError, match="holds the input batch"):
        run_encode(ctx, str(folder))
    with pytest.raises(DataError, match="holds the input batch"):
        run_encode(ctx, str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DataError, match="current folder"):
        run_encode(ctx, ".")
    assert tree(tmp_path) == before


def test_encode_replaces_only_a_folder_it_wrote(tmp_path, use_encoder):
    a = write(tmp_path / "a.parquet", frame(50, seed=1), 20)
    b = write(tmp_path / "b.parquet", frame(40, seed=2), 20)
    out = tmp_path / "out"
    first = run_encode(make_ctx(tmp_path, [a], use_encoder.contract), str(out))
    assert first["rows_in"] == 50
    second = run_encode(make_ctx(tmp_path, [b], use_encoder.contract, "manual__2"), str(out))
    assert second["rows_in"] == 40 and second["batch_key"] != first["batch_key"]
    assert len(encoding.read_output(str(out))) == 40
    (out / "notes.txt").write_text("mine")  # a file of the user's now sits in our folder
    with pytest.raises(DataError, match=r"did not write.*notes\.txt"):
        run_encode(make_ctx(tmp_path, [a], use_encoder.contract, "manual__3"), str(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_reencode_on_an_object_store_leaves_the_last_output_whole(
    tmp_path, use_encoder, monkeypatch
):
    import fsspec

    fs = fsspec.filesystem("memory")
    out = "memory://sae-enc-test/out"
    a = write(tmp_path / "a.parquet", frame(300, seed=1), 100)
    b = write(tmp_path / "b.parquet", frame(300, seed=2), 100)
    ctx_a = make_ctx(tmp_path, [a], use_encoder.contract)
    ctx_b = make_ctx(tmp_path, [b], use_encoder.contract, "manual__2")
    try:
        first = run_encode(ctx_a, out, shard_rows=100)
        assert len(first["parts"]) == 3
        encoded_a = encoding.read_output(out)
        real = encoding.encode_shard

        def failing(encoder, shard, *args, **kwargs):
            if shard["index"] == 1:
                raise OSError("network down in shard 2")
            return real(encoder, shard, *args, **kwargs)

        monkeypatch.setattr(encoding, "encode_shard", failing)
        with pytest.raises(OSError, match="shard 2"):
            run_encode(ctx_b, out, shard_rows=100)
        # The manifest still describes batch a, and every part it names is batch a's.
        assert encoding.committed(encoding.prepare(ctx_a, out))["batch_key"] == first["batch_key"]
        pd.testing.assert_frame_equal(encoding.read_output(out), encoded_a)
        assert run_encode(ctx_a, out, shard_rows=100) == first
        monkeypatch.setattr(encoding, "encode_shard", real)
        second = run_encode(ctx_b, out, shard_rows=100)
        got = encoding.read_output(out)
        assert got["id"].tolist() == frame(300, seed=2)["id"].tolist()
        assert not np.allclose(got[use_encoder.code_columns], encoded_a[use_encoder.code_columns])
        # a's parts, named by its manifest, are gone; b's manifest names only b's parts.
        left = sorted(p.split("/out/", 1)[1] for p in fs.find("/sae-enc-test/out"))
        assert left == sorted(["_manifest.json", *second["parts"]])
    finally:
        if fs.exists("/sae-enc-test"):
            fs.rm("/sae-enc-test", recursive=True)


def test_the_encode_key_follows_the_content_not_the_path(tmp_path, use_encoder):
    path = tmp_path / "today.parquet"
    write(path, frame(60, seed=1), 20)
    out = str(tmp_path / "out")
    first = run_encode(make_ctx(tmp_path, [str(path)], use_encoder.contract), out)
    write(path, frame(60, seed=2), 20)  # other rows, the same count, the same name
    second = run_encode(make_ctx(tmp_path, [str(path)], use_encoder.contract, "manual__2"), out)
    assert second["batch_key"] != first["batch_key"]
    assert second["dag_run_id"] == "manual__2"
    got = encoding.read_output(out)
    expected = use_encoder.transform(frame(60, seed=2), output="all")
    np.testing.assert_allclose(
        got[use_encoder.code_columns], expected[use_encoder.code_columns], rtol=1e-5
    )


@pytest.mark.parametrize("flag", ["--chunk-rows", "--shard-rows"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_chunk_and_shard_sizes_are_rejected(
    tmp_path, use_encoder, monkeypatch, flag, value
):
    src = write(tmp_path / "b.parquet", frame(30), 10)
    ctx = make_ctx(tmp_path, [src], use_encoder.contract)
    monkeypatch.setattr("sae_pipeline.steps.batch_context.batch_context", lambda *a, **k: ctx)
    out = tmp_path / "out"
    rc, _, err = run_cli(["encode", "--batch", src, "--output", str(out), flag, value, "-q"])
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1
    assert f"{flag} must be a positive integer, got {value}" in err
    assert not out.exists()
    key = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(SaePipelineError, match=f"{flag} must be a positive integer"):
        encoding.prepare(ctx, str(out), **{key: int(value)})


USER_FILES = st.lists(
    st.tuples(
        st.sampled_from(["notes.txt", "sub/data.csv", ".hidden", "_SUCCESS", "_manifest.json",
                         "part-00000.parquet", "_quarantine/part-00001.parquet",
                         "x/part-00002.parquet"]),
        st.binary(min_size=1, max_size=20),
    ),
    max_size=3,
    unique_by=lambda t: t[0],
)  # fmt: skip


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    user_files=USER_FILES,
    where=st.sampled_from(["new", "user folder", "our output", "batch folder", "current folder"]),
)
def test_encode_never_removes_a_file_it_did_not_write(use_encoder, monkeypatch, user_files, where):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, monkeypatch.context() as patch:
        root = Path(tmp)
        (root / "landing").mkdir()
        patch.chdir(root / "landing" if where == "current folder" else root)
        src = write(root / "landing" / "b.parquet", frame(30), 10)
        out = {"batch folder": root / "landing", "current folder": root}.get(where, root / "out")
        ours: set[str] = set()
        if where == "our output":
            other = write(root / "other.parquet", frame(20, seed=3), 10)
            run_encode(make_ctx(root, [other], use_encoder.contract, "manual__0"), str(out))
            ours = set(tree(out))
        for name, data in user_files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        user = {n: b for n, b in (tree(out) if out.exists() else {}).items() if n not in ours}
        try:
            run_encode(make_ctx(root, [src], use_encoder.contract), str(out))
            refused = False
        except DataError:
            refused = True
        after = tree(out)
        for name, data in user.items():
            assert after.get(name) == data, f"{name} was removed or changed ({where})"
        if not user_files and where in ("new", "user folder", "our output"):
            assert not refused  # a new, empty or own folder is written


def test_a_decimal_batch_encodes_like_its_floats(tmp_path, encoder):
    from decimal import Decimal

    data = frame(40).round(2)
    table = pa.Table.from_pandas(data, preserve_index=False)
    for c in FEATURES:
        decimals = pa.array([Decimal(f"{v:.2f}") for v in data[c]], pa.decimal128(6, 2))
        table = table.set_column(table.schema.get_field_index(c), c, decimals)
    pq.write_table(table, tmp_path / "d.parquet")
    files = batches.list_files(str(tmp_path / "d.parquet"))
    batches.inspect_batch(files, encoder.contract)  # was: "is decimal128(6, 2), not numeric"
    (shard,) = batch_encoding.plan(files)
    result = batch_encoding.encode_shard(
        encoder, shard, str(tmp_path / "p.parquet"), str(tmp_path / "q.parquet"), id_column="id"
    )
    assert result["rows_encoded"] == 40
    expected = encoder.transform(data.astype(dict.fromkeys(FEATURES, "float64")), output="all")
    got = pd.read_parquet(tmp_path / "p.parquet")
    np.testing.assert_allclose(got[encoder.code_columns], expected[encoder.code_columns], rtol=1e-5)


def test_encoding_on_another_device_never_moves_the_cached_encoder():
    """``encode_rows(..., device)`` moved the shared encoder's network in place (net.to)."""
    import torch

    from sae_pipeline.engine.encoder import encode_rows

    assert encoding.ENCODE_DEVICE == "cpu"  # CPU workers, unless a GPU benchmark wins
    contract = Contract(FEATURES, dict.fromkeys(FEATURES, "float64"), None, None)
    x = np.random.default_rng(0).normal(size=(50, len(FEATURES)))
    encoder = Encoder(contract, fit_scaler("minmax", x), build_net(Architecture(6, [5, 3]), seed=0))
    expected, _ = encode_rows(encoder, x)
    with pytest.raises(NotImplementedError):  # meta has no data to copy back: a stand-in GPU
        encode_rows(encoder, x, torch.device("meta"))
    assert {p.device.type for p in encoder.net.parameters()} == {"cpu"}
    assert encoder.net_on(torch.device("meta")) is encoder.net_on("meta")  # one copy, reused
    codes, _ = encode_rows(encoder, x, torch.device("cpu"))
    np.testing.assert_array_equal(codes, expected)


def test_a_chunk_larger_than_the_memory_bound_is_rejected(tmp_path, use_encoder, monkeypatch):
    """A chunk is held in memory whole: a trigger's ``chunk_rows`` cannot lift the bound."""
    src = write(tmp_path / "b.parquet", frame(30), 10)
    ctx = make_ctx(tmp_path, [src], use_encoder.contract)
    monkeypatch.setattr("sae_pipeline.steps.batch_context.batch_context", lambda *a, **k: ctx)
    out = tmp_path / "out"
    too_big = str(encoding.MAX_CHUNK_ROWS + 1)
    rc, _, err = run_cli(["encode", "--batch", src, "--output", str(out), "--chunk-rows", too_big])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--chunk-rows must be at most {encoding.MAX_CHUNK_ROWS:,}" in err
    assert not out.exists()
    with pytest.raises(SaePipelineError, match="--chunk-rows must be at most"):
        encoding.prepare(ctx, str(out), chunk_rows=10**12)
    assert encoding.prepare(ctx, str(out), chunk_rows=encoding.MAX_CHUNK_ROWS)["chunk_rows"]
