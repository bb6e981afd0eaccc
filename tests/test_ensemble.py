"""Teacher ensembles: how members combine, their members' resolution, and the CLI from training the
members to a report that says how much of the ensemble's gain the student kept."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import QUICK
from test_units import DATA
from kdrun.cli import conf_dir
from kdrun.commands import teacher
from kdrun.data.batches import Batch
from kdrun.ensemble import Ensemble, combine_logits
from kdrun.io import read_json, sha256_file
from kdrun.models import MLP
from kdrun.objectives import CachedLogits, OnlineTeacher

LN3 = math.log(3)
# member 1 says [1/4, 3/4], member 2 says [1/2, 1/2] (at T=1)
TWO_MEMBERS = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])


def at(logits, T):
    return torch.softmax(logits / T, dim=-1)


def test_arithmetic_and_geometric_means_against_hand_computed_values():
    arithmetic = at(combine_logits(TWO_MEMBERS, "arithmetic", 1.0), 1.0)
    assert torch.allclose(arithmetic, torch.tensor([[0.375, 0.625]]), atol=1e-6)
    geometric = at(combine_logits(TWO_MEMBERS, "geometric", 1.0), 1.0)
    a, b = math.sqrt(0.25 * 0.5), math.sqrt(0.75 * 0.5)  # normalised geometric mean
    assert torch.allclose(geometric, torch.tensor([[a / (a + b), b / (a + b)]]), atol=1e-6)
    # at T=2 member 1 says [1, sqrt 3] / (1 + sqrt 3): the arithmetic mean is taken at T, not before
    s = math.sqrt(3)
    expected = torch.tensor([[(1 / (1 + s) + 0.5) / 2, (s / (1 + s) + 0.5) / 2]])
    assert torch.allclose(at(combine_logits(TWO_MEMBERS, "arithmetic", 2.0), 2.0), expected, atol=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_geometric_mean_is_softmax_of_mean_logits_at_every_T(T):
    z = torch.randn(6, 5, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    product = at(z, T).prod(dim=-2) ** (1 / 5)
    expected = product / product.sum(-1, keepdim=True)
    assert torch.allclose(at(combine_logits(z, "geometric", T), T), expected, atol=1e-10)
    assert torch.allclose(at(combine_logits(z, "arithmetic", T), T), at(z, T).mean(-2), atol=1e-10)


def test_high_temperature_limit_the_two_means_agree_and_none_gives_mean_logits():
    z = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    gaps = [(at(combine_logits(z, "arithmetic", T), T) - at(combine_logits(z, "geometric", T), T)).abs().max()
            for T in (10.0, 100.0, 1000.0)]
    assert gaps[0] > gaps[1] * 50 > gaps[2] * 50 * 50  # O(1/T^2): 100x smaller per 10x in T
    for combine in ("arithmetic", "geometric"):
        assert torch.equal(combine_logits(z, combine, None), z.mean(dim=-2))
    with pytest.raises(ValueError, match="combine must be one of arithmetic, geometric, got 'median'"):
        combine_logits(z, "median", 1.0)


def test_ensemble_module_and_both_teacher_signals_give_the_combined_targets():
    torch.manual_seed(0)
    members = [MLP([1, 4, 4], 3, [8]).eval() for _ in range(3)]
    ensemble = Ensemble(members, "arithmetic").eval()
    x = torch.randn(5, 1, 4, 4)
    stacked = ensemble.member_logits(x)
    assert stacked.shape == (5, 3, 3) and torch.equal(stacked[:, 1], members[1](x))
    mean_p = torch.stack([at(m(x), 1.0) for m in members]).mean(0)
    assert torch.allclose(at(ensemble(x), 1.0), mean_p, atol=1e-6)
    batch = Batch(x, None, torch.tensor([4, 0, 2, 1, 3]))
    cache = CachedLogits(stacked.detach(), "arithmetic")
    mean_p4 = torch.stack([at(m(x[batch.idx]), 4.0) for m in members]).mean(0)
    assert torch.allclose(at(cache(batch, 4.0), 4.0), mean_p4, atol=1e-6)
    assert torch.allclose(at(OnlineTeacher(ensemble, "arithmetic")(Batch(x[batch.idx], None, batch.idx), 4.0), 4.0),
                          mean_p4, atol=1e-6)


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
        return cfg, teacher.source(cfg, DATA).members


def test_members_by_seed_by_overrides_and_by_path_and_their_store_keys():
    from kdrun import store
    from kdrun.parts import fold_recipe_overrides

    cfg, group = compose_cfg("distill", ["teacher=ensemble", "teacher.member=mlp30", "teacher.recipe.epochs=2",
                                         "teacher.members=[3,'teacher=mlp300 seed=1','/x/model.pt']"])
    assert [m.where for m in group] == ["teacher.members[0]", "teacher.members[1]", "teacher.members[2]"]
    assert (group[0].cfg.teacher.name, group[0].seed, group[1].cfg.teacher.name, group[1].seed) == ("mlp30", 3, "mlp300", 1)
    assert group[2].ckpt == "/x/model.pt" and group[2].cfg is None
    # a member's key is the key `kdrun train teacher=mlp30 seed=3 epochs=2` stores its teacher under
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        trained = fold_recipe_overrides(compose(config_name="train", overrides=["teacher=mlp30", "epochs=2"]), ["teacher"])
    assert group[0].key == store.teacher_key(trained, 3, DATA)
    assert group[1].cfg.teacher.recipe.epochs == 2  # the ensemble's recipe reaches every member


@pytest.fixture
def kdrun(kdrun_here):
    """The CLI in this process: the test is about what the commands write, not about their processes."""
    return kdrun_here


def test_cli_members_as_a_sweep_then_ensemble_distill_evaluate_and_report(kdrun, workdir, env, tmp_path):
    t = ["teacher.recipe.epochs=1", *QUICK]
    members = ["teacher=ensemble", "teacher.member=mlp30", "teacher.members=[0,1,2]"]
    kdrun("train", "-m", "teacher=mlp30", "seed=0,1", *t)
    stored = set(p.parent.name for p in (workdir / "teachers").glob("*/model.pt"))
    assert len(stored) == 2
    kdrun("train", *members, *t, "hydra.run.dir=" + str(tmp_path / "ens_train"))
    member_results = [read_json(tmp_path / "ens_train" / f"member_{i}" / "results.json") for i in range(3)]
    assert [r["status"] for r in member_results] == ["reused", "reused", "completed"]  # only seed 2 was missing
    ens = read_json(tmp_path / "ens_train" / "results.json")
    assert ens["teacher"] == "ensemble(arithmetic, 3x mlp30)" and len(ens["members"]) == 3

    # the ensemble's errors, recomputed here from the stored members' files and the test split
    from kdrun.data.loading import load_data

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*QUICK, f"data_dir={env['KDRUN_DATA']}"])
    test = load_data(cfg, torch.device("cpu")).test
    x = next(test.batches(len(test))).x
    probs = []
    for m in ens["members"]:
        path = workdir / "teachers" / m["key"] / "model.pt"
        assert sha256_file(path) == m["sha256"]
        payload = torch.load(path, weights_only=False)
        model = MLP([1, 28, 28], 10, payload["arch"]["hidden"])
        model.load_state_dict(payload["model"])
        with torch.no_grad():
            probs.append(torch.softmax(model.eval()(x), dim=1))
    assert ens["test_errors"] == int((torch.stack(probs).mean(0).argmax(1) != test.labels).sum())

    kdrun("distill", *members, *t, "student=mlp30", "T=4", "epochs=1", "hydra.run.dir=" + str(tmp_path / "distilled"))
    res = read_json(tmp_path / "distilled" / "results.json")
    assert res["teacher_key"] == ens["teacher_key"] and res["teacher"] == ens["teacher"] and res["teacher_ckpt"] is None
    cache = torch.load(res["soft_targets"], weights_only=True)
    assert list(cache["logits"].shape) == [1000, 3, 10]
    assert [m["sha256"] for m in cache["manifest"]["members"]] == [m["sha256"] for m in ens["members"]]

    kdrun("evaluate", *members, *t, "hydra.run.dir=" + str(tmp_path / "evaluated"))
    ev = read_json(tmp_path / "evaluated" / "results.json")
    assert ev["test_errors"] == ens["test_errors"] == sum(c["errors"] for c in ev["per_class"])
    assert [m["test_errors"] for m in ev["members"]] == [r["test_errors"] for r in member_results]
    assert sum(map(sum, ev["confusion"])) == ev["n_test"] == 500
    student = kdrun("evaluate", f"ckpt={res['model']}", *QUICK, "hydra.run.dir=" + str(tmp_path / "student_eval"))
    assert read_json(tmp_path / "student_eval" / "results.json")["test_errors"] == res["test_errors"]
    assert f"{res['test_errors']} test errors of 500" in student.stdout

    kdrun("distill", *members, *t, "student=mlp30", "alpha=0", "epochs=1", "hydra.run.dir=" + str(tmp_path / "alone"))
    kdrun("report", str(tmp_path / "ens_train"), str(tmp_path / "distilled"), str(tmp_path / "alone"),
          "--out", str(tmp_path / "report"))
    rows = {r["teacher"] + "|" + r["role"]: r for r in csv_rows(tmp_path / "report" / "report.csv")}
    ens_row = rows["ensemble(arithmetic, 3x mlp30)|teacher"]
    assert float(ens_row["errors_mean"]) == ens["test_errors"]
    assert float(rows["mlp30|teacher"]["errors_mean"]) == pytest.approx(sum(r["test_errors"] for r in member_results) / 3)
    distilled = rows["ensemble(arithmetic, 3x mlp30)|distilled"]
    single = ens["members_test_errors_mean"]
    if single > ens["test_errors"]:
        kept = (single - res["test_errors"]) / (single - ens["test_errors"])
        assert float(distilled["gain_kept"]) == pytest.approx(kept)
    else:
        assert distilled["gain_kept"] == ""


def csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_manifest_of_an_ensemble_names_every_member():
    from kdrun import soft_targets

    transfer = {"dataset": "x", "split": "train", "limit": None, "subset_seed": 0, "n": 32, "transform": "t"}
    members = [{"member": f"teacher.members[{i}]", "key": f"k{i}", "sha256": f"s{i}", "test_errors": 3} for i in range(4)]
    manifest = soft_targets.manifest_for("ens", transfer, 10, members)
    assert manifest["shape"] == [32, 4, 10]
    assert manifest["members"] == [{"member": f"teacher.members[{i}]", "key": f"k{i}", "sha256": f"s{i}"} for i in range(4)]
    assert json.loads(json.dumps(manifest)) == manifest
