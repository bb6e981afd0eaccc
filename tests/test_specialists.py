"""`kdrun specialists` end to end on a Fashion-MNIST subset, and how a specialist starts from its generalist."""

import math

import pytest
import torch

from kdrun.io import read_json
from kdrun.models import MLP
from kdrun.specialists.heads import init_from_generalist

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SMALL = ["teacher=mlp300", "dataset=fashion_mnist", "dataset.limit=3000", "dataset.test_limit=1000", "progress=false",
         "transfer.val_size=500", "teacher.recipe.epochs=3", "specialists.recipe.epochs=2", "specialists.k=4"]


def test_a_specialist_starts_as_its_generalist_on_its_classes_and_a_log_sum_exp_dustbin():
    torch.manual_seed(0)
    generalist = MLP([1, 4, 4], 6, [8]).eval()
    with torch.no_grad():
        generalist.head.weight[[0, 2, 3, 5]] = generalist.head.weight[0].clone()  # the others score alike
        generalist.head.bias[[0, 2, 3, 5]] = 0.7
    specialist = MLP([1, 4, 4], 3, [8]).eval()
    init_from_generalist(specialist, generalist, (1, 4))
    x = torch.randn(7, 1, 4, 4)
    g, s = generalist(x), specialist(x)
    assert torch.allclose(s[:, :2], g[:, [1, 4]], atol=1e-6)
    assert torch.allclose(s[:, 2], torch.logsumexp(g[:, [0, 2, 3, 5]], dim=1), atol=1e-5)
    assert torch.allclose(specialist.body[2].weight, generalist.body[2].weight)


@pytest.fixture
def kdrun(kdrun_here):
    """The CLI in this process: the test is about what the commands write, not about their processes."""
    return kdrun_here


def test_specialists_cluster_confusable_classes_train_with_a_dustbin_and_combine(kdrun, workdir, tmp_path):
    out = kdrun("specialists", *SMALL, f"hydra.run.dir={tmp_path / 'first'}")
    res = read_json(tmp_path / "first" / "results.json")
    clusters = res["cluster_classes"]
    assert clusters and all(len(c) >= 2 for c in clusters)
    assert len({c for cluster in clusters for c in cluster}) == sum(map(len, clusters))  # disjoint
    assert res["clusters"] == [[NAMES[c] for c in cluster] for cluster in clusters]
    # the upper-body garments are what a Fashion-MNIST generalist confuses: they share a cluster
    tops = next(c for c in clusters if 6 in c)  # shirt
    assert {0, 2, 4} & set(tops), res["clusters"]
    for cluster, sp in zip(clusters, res["specialists"]):
        run = read_json(tmp_path / "first" / f"specialist_{clusters.index(cluster)}" / "results.json")
        n_own = round(2500 * len(cluster) / 10)  # the stratified 2500 left after holding out 500
        n_drawn = min(n_own, 2500 - n_own)
        assert run["n_train"] == sp["n_train"] == n_own + n_drawn  # its classes, and as many others
        assert sp["dustbin_shift"] == pytest.approx(math.log((2500 - n_own) / n_drawn))
        assert run["classes"] == cluster
    table = res["by_covering"]
    assert sum(r["n_test"] for r in table) == res["n_test"] == 1000
    assert res["test_errors"] == 1000 - sum(r["combined_correct"] for r in table)
    assert res["generalist_test_errors"] == 1000 - sum(r["generalist_correct"] for r in table)
    assert sum(r["n_test"] for r in table if r["covering"] == 1) == 100 * sum(map(len, clusters))
    assert f"| generalist                           | {res['generalist_test_errors']}" in out.stdout
    assert (tmp_path / "first" / "report.md").read_text() == out.stdout.rstrip("\n") + "\n"

    # specialists as parallel jobs (any launcher), then a plain run that only combines: same numbers
    kdrun("specialists", "-m", *SMALL, "specialists.only=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
          f"workdir={tmp_path / 'work2'}")
    for job in (0, 1):
        only = read_json(tmp_path / "sweep" / str(job) / "results.json")
        assert only["only"] == job and only["specialists"][0]["classes"] == clusters[job]
    kdrun("specialists", *SMALL, f"workdir={tmp_path / 'work2'}", f"hydra.run.dir={tmp_path / 'again'}")
    again = read_json(tmp_path / "again" / "results.json")
    trained_again = [p.parent.name for p in (tmp_path / "again").rglob("metrics.jsonl")]
    assert trained_again == [f"specialist_{i}" for i in range(2, len(clusters))]  # 0 and 1 came from the store
    assert (again["test_errors"], again["generalist_test_errors"]) == (res["test_errors"], res["generalist_test_errors"])

    if len(clusters) < 4:  # k=4 clusters, some too small for a specialist: asking for one of those fails
        failed = kdrun("specialists", *SMALL, "specialists.only=3", check=False)
        assert failed.returncode == 2
        assert failed.stderr.splitlines()[-1] == (f"kdrun: error: specialists.only=3, but the clustering gave "
                                                  f"{len(clusters)} specialists (0..{len(clusters) - 1})")
    # a specialist's model.pt has its own outputs: it is not a model of the 10 classes
    specialist = tmp_path / "first" / "specialist_0" / "model.pt"
    refused = kdrun("evaluate", f"ckpt={specialist}", *SMALL[1:5], check=False)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"kdrun: error: model checkpoint {specialist} has {len(clusters[0]) + 1} outputs (specialist of classes "
        f"{clusters[0]}), not the 10 classes of fashion_mnist")
