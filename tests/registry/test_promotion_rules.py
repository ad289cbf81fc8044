"""``registry.promotion`` on an in-memory registry: the pairing rule, repair, settling, the lock.

tests/registry/test_promotion.py drives the same code through a real MLflow store with a
failure injected at every write (slow); these tests pin each rule on its own in milliseconds,
so ``make mutation`` can run them for every mutant of the module.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import mlflow
import pytest

from sae_pipeline.config import build_config
from sae_pipeline.errors import RegistryError
from sae_pipeline.registry import promotion
from sae_pipeline.registry.tracking import CHAMPION, RUN_KEY_TAG

ENC, SC = "enc", "sc"


class Registry:
    """The slice of ``MlflowClient`` promotion uses: versions with tags, aliases; every alias
    write recorded. ``on_read`` runs before each alias read (another writer, in a test)."""

    def __init__(self):
        self.versions = {ENC: {}, SC: {}}
        self.aliases: dict[tuple[str, str], str] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.on_read = None

    def add(self, name: str, version: str, run_key: str | None):
        tags = {RUN_KEY_TAG: run_key} if run_key else {}
        self.versions[name][version] = SimpleNamespace(name=name, version=version, tags=tags)

    def get_model_version_by_alias(self, name, alias):
        if self.on_read is not None:
            self.on_read(self, name, alias)
        if (name, alias) not in self.aliases:
            raise mlflow.exceptions.MlflowException(f"no alias {alias} on {name}")
        return self.versions[name][self.aliases[(name, alias)]]

    def get_model_version(self, name, version):
        return self.versions[name][str(version)]

    def search_model_versions(self, filter_string):
        name = filter_string.split("'")[1]
        return list(self.versions[name].values())

    def set_registered_model_alias(self, name, alias, version):
        self.writes.append((name, alias, str(version)))
        self.aliases[(name, alias)] = str(version)


@pytest.fixture
def reg():
    r = Registry()
    for v, key in (("1", "run-a"), ("2", "run-b"), ("3", "run-c")):
        r.add(ENC, v, key)
    for v, key in (("7", "run-b"), ("8", "run-a"), ("9", "run-c")):
        r.add(SC, v, key)  # registered in another order: versions do not line up
    return r


def test_the_partner_is_the_scaler_of_the_same_run(reg):
    assert promotion.paired_scaler(reg, SC, reg.versions[ENC]["1"]) == "8"
    assert promotion.paired_scaler(reg, SC, reg.versions[ENC]["2"]) == "7"
    reg.add(ENC, "4", "run-lonely")
    with pytest.raises(RegistryError, match=r"enc version 4 \(run key 'run-lonely'\) has no sc"):
        promotion.paired_scaler(reg, SC, reg.versions[ENC]["4"])
    reg.add(ENC, "5", None)
    with pytest.raises(RegistryError, match="register the pair again"):
        promotion.paired_scaler(reg, SC, reg.versions[ENC]["5"])


def test_set_champion_moves_both_aliases_encoder_first(reg):
    assert promotion.set_champion(reg, ENC, "2", SC) == "2"
    assert reg.aliases == {(ENC, CHAMPION): "2", (SC, CHAMPION): "7"}
    assert reg.writes == [(ENC, CHAMPION, "2"), (SC, CHAMPION, "7")]  # no repair was needed


def test_converge_repairs_a_split_pair_and_leaves_a_good_one(reg):
    assert promotion.converge(reg, ENC, SC) is None  # no champion: nothing to pair
    assert reg.writes == []
    reg.aliases = {(ENC, CHAMPION): "3", (SC, CHAMPION): "8"}  # split: run-c with run-a's scaler
    assert promotion.converge(reg, ENC, SC) == "3"
    assert reg.aliases[(SC, CHAMPION)] == "9" and reg.writes == [(SC, CHAMPION, "9")]
    reg.writes.clear()
    assert promotion.converge(reg, ENC, SC) == "3"
    assert reg.writes == []  # already a pair: no write
    del reg.aliases[(SC, CHAMPION)]  # the scaler's alias lost
    assert promotion.converge(reg, ENC, SC) == "3" and reg.aliases[(SC, CHAMPION)] == "9"
    reg.aliases[("enc", "challenger")], reg.aliases[("sc", "challenger")] = "1", "7"
    assert promotion.converge(reg, ENC, SC, alias="challenger") == "1"
    assert reg.aliases[("sc", "challenger")] == "8" and reg.aliases[(SC, CHAMPION)] == "9"


def test_converge_follows_an_encoder_alias_that_moved_once_then_settles(reg):
    reg.aliases = {(ENC, CHAMPION): "1", (SC, CHAMPION): "8"}
    moves = iter(["2"])

    def other_writer(r, name, alias):
        if name == SC:  # between our reads of the encoder alias, another promotion lands
            r.aliases[(ENC, CHAMPION)] = next(moves, r.aliases[(ENC, CHAMPION)])

    reg.on_read = other_writer
    assert promotion.converge(reg, ENC, SC) == "2"
    assert reg.aliases[(SC, CHAMPION)] == "7"  # the partner of the version that stayed


@pytest.mark.parametrize("tries", [1, 5])
def test_converge_gives_up_naming_the_model_when_the_alias_keeps_moving(reg, tries):
    reg.aliases = {(ENC, CHAMPION): "1", (SC, CHAMPION): "8"}
    flip = {"1": "2", "2": "1"}
    reads = []

    def restless(r, name, alias):
        if name == SC:
            reads.append(name)
            r.aliases[(ENC, CHAMPION)] = flip[r.aliases[(ENC, CHAMPION)]]

    reg.on_read = restless
    with pytest.raises(RegistryError, match="enc@champion keeps moving"):
        promotion.converge(reg, ENC, SC, tries=tries)
    assert len(reads) == tries  # it tried exactly that often


def test_converge_settles_on_the_last_try(reg):
    reg.aliases = {(ENC, CHAMPION): "1", (SC, CHAMPION): "8"}
    left = {"moves": 4}

    def four_moves(r, name, alias):
        if name == SC and left["moves"]:
            left["moves"] -= 1
            r.aliases[(ENC, CHAMPION)] = "2" if r.aliases[(ENC, CHAMPION)] == "1" else "1"

    reg.on_read = four_moves
    assert promotion.converge(reg, ENC, SC) == "1"  # the fifth try saw no move


def test_the_promotion_lock_serialises_and_names_the_model_on_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv(promotion.LOCK_DIR_ENV, str(tmp_path / "locks"))
    cfg = build_config(
        {}, {"artifacts_root": str(tmp_path), "registry.promotion_lock_timeout_s": 0.3}
    )
    with promotion.promotion_lock(cfg, "enc"):
        assert list((tmp_path / "locks").rglob("*.lock"))  # in the deployment's lock folder
        held = pytest.raises(RegistryError, match=r"cannot promote enc: lock .* still held")
        with held, promotion.promotion_lock(cfg, "enc"):
            pytest.fail("entered a held lock")
        with promotion.promotion_lock(cfg, "other"):  # one lock per model
            pass
    order = []
    patient = build_config({}, {"artifacts_root": str(tmp_path)})  # waits its full timeout
    with promotion.promotion_lock(cfg, "enc"):
        t = threading.Thread(target=lambda: _hold(patient, order))
        t.start()
        time.sleep(0.1)
        order.append("first")
    t.join()
    assert order == ["first", "second"]


def _hold(cfg, order):
    with promotion.promotion_lock(cfg, "enc"):
        order.append("second")


def test_without_a_lock_folder_the_lock_is_private_to_this_user_and_registry(tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.delenv(promotion.LOCK_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = build_config({}, {"registry.tracking_uri": "sqlite:///a.db"})
    b = build_config({}, {"registry.tracking_uri": "sqlite:///b.db"})
    uri = promotion.lock_uri(a, "enc")
    private = tmp_path / f"sae-pipeline-{os.getuid()}"
    assert uri.startswith(f"{private}/promote/") and uri.endswith(".lock")
    assert (private.stat().st_mode & 0o777) == 0o700
    assert promotion.lock_uri(b, "enc") != uri  # one lock per registry
    assert promotion.lock_uri(a, "other") != uri  # and per model
    assert promotion.lock_uri(a, "enc") == uri
    os.chown(private, os.getuid() + 1, -1)  # the folder now belongs to someone else
    with pytest.raises(RegistryError, match=f"{private} belongs to another user; set SAE_LOCK_DIR"):
        promotion.lock_uri(a, "enc")


def test_converge_tries_five_times_by_default_and_says_what_it_repaired(reg, caplog):
    reg.aliases = {(ENC, CHAMPION): "1", (SC, CHAMPION): "8"}
    left = {"moves": 5}

    def five_moves(r, name, alias):
        if name == SC and left["moves"]:
            left["moves"] -= 1
            r.aliases[(ENC, CHAMPION)] = "2" if r.aliases[(ENC, CHAMPION)] == "1" else "1"

    reg.on_read = five_moves
    with pytest.raises(RegistryError, match="keeps moving"):
        promotion.converge(reg, ENC, SC)
    reg.on_read = None
    reg.aliases = {(ENC, CHAMPION): "3", (SC, CHAMPION): "8"}
    with caplog.at_level("WARNING"):
        promotion.converge(reg, ENC, SC)
    assert "sc@champion was on 8, not on 9 (the partner of enc v3): repaired" in caplog.text
