"""Quality signals of pre-training: weighted k-NN (fastmim_ds.knn), reconstruction skill (fastmim_ds.quality), the
labelled subset of the semi-supervised protocol and `fastmim-ds knn`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmim_ds.cli import main as cli
from fastmim_ds.config import PretrainCfg, PretrainEvalCfg, load_config
from fastmim_ds.data.loaders import dataset_labels, labeled_subset
from fastmim_ds.knn import knn_evaluate, knn_predict, knn_top1
from fastmim_ds.methods import create_mim_model
from fastmim_ds.quality import QualityMonitor, mean_target, skill_sums, spread_indices

TINY = ["model.encoder_kwargs={embed_dim: 32, depth: 1, num_heads: 1}", "method.decoder_dim=32", "data.img_size=32"]


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_knn_separable_classes_are_found_and_random_features_are_at_chance():
    bank, bank_y = _clusters(50, 10, 32, 0.5, seed=0)
    query, query_y = _clusters(20, 10, 32, 0.5, seed=0)
    query = query + 0.1 * torch.randn(query.shape, generator=torch.Generator().manual_seed(1))
    assert knn_top1(query, query_y, bank, bank_y, num_classes=10) == 100.0
    g = torch.Generator().manual_seed(2)
    rand_bank, rand_query = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    top1 = knn_top1(rand_query, torch.randint(0, 10, (2000,), generator=g), rand_bank,
                    torch.randint(0, 10, (2000,), generator=g), num_classes=10)
    assert 6.0 < top1 < 14.0  # chance = 10 %


def test_knn_votes_are_weighted_by_exp_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(torch.tensor([[1.0, 0.1]]), bank, labels, num_classes=2, k=3, temperature=0.07)
    s0, s1 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1]]), dim=1)[0]
    assert torch.allclose(scores, torch.tensor([[torch.exp(s0 / 0.07), 2 * torch.exp(s1 / 0.07)]]), rtol=1e-5)
    assert scores.argmax().item() == 0  # one close neighbour outvotes two far ones


def test_knn_evaluate_on_loaders_equals_the_one_process_rule():
    bank, bank_y = _clusters(30, 4, 8, 3.0, seed=3)
    query, query_y = _clusters(10, 4, 8, 3.0, seed=4)
    batches = lambda x, y: [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]  # noqa: E731
    out = knn_evaluate(lambda imgs: imgs, batches(bank, bank_y), batches(query, query_y), num_classes=4,
                       device=torch.device("cpu"))
    assert out["knn_top1"] == pytest.approx(knn_top1(query, query_y, bank, bank_y, num_classes=4))
    assert out["knn_bank"] == 120 and out["knn_queries"] == 40 and out["knn_seconds"] >= 0


def test_mean_predictor_has_skill_ratio_one_and_a_perfect_one_zero():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, 16, 27, generator=g)
    mask = torch.rand(6, 16, generator=g) > 0.5
    mean = target.mean(0)
    err, base, count = skill_sums({"pred": mean.expand_as(target), "target": target, "mask": mask}, mean)
    assert err / base == pytest.approx(1.0) and count == mask.sum().item()
    err, base, _ = skill_sums({"pred": target, "target": target, "mask": mask}, mean)
    assert err == 0.0 and base > 0


def test_spread_indices():
    assert spread_indices(10, 0).tolist() == list(range(10))
    assert spread_indices(100, 5).tolist() == [0, 25, 50, 74, 99]


def test_labeled_subset_is_class_balanced_seeded_and_stable(small_beton):
    train = str(small_beton / "train.beton")
    labels = dataset_labels(train)
    assert np.bincount(labels).tolist() == [24] * 10
    sub = labeled_subset(train, fraction=0.25, seed=0)
    assert np.bincount(labels[sub.astype(np.int64)], minlength=10).tolist() == [6] * 10
    assert (labeled_subset(train, fraction=0.25, seed=0) == sub).all()
    assert not (labeled_subset(train, fraction=0.25, seed=1) == sub).all()
    per = labeled_subset(train, per_class=3, seed=0)
    assert np.bincount(labels[per.astype(np.int64)], minlength=10).tolist() == [3] * 10
    assert labeled_subset(train) is None
    with pytest.raises(ValueError, match="fraction"):
        labeled_subset(train, fraction=0.0)


def test_quality_monitor_on_real_images(small_beton, one_rank_group):
    cfg = load_config(PretrainCfg, None, TINY)
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, 32)
    ev = PretrainEvalCfg(skill_every=1, skill_images=16, skill_mean_images=64, knn_every=2, batch_size=32)
    mon = QualityMonitor(ev, train=str(small_beton / "train.beton"), val=str(small_beton / "val.beton"),
                         num_classes=10, rank=0, world_size=1, device=torch.device("cpu"), num_workers=1)
    assert mon(model, 0, 32).keys() == {"skill_mse", "skill_mean_mse", "skill_ratio"}
    row = mon(model, 1, 32)
    assert {"skill_ratio", "knn_top1", "knn_seconds", "knn_bank", "knn_queries"} <= row.keys()
    assert row["knn_bank"] == 240 and row["knn_queries"] == 80 and 0 <= row["knn_top1"] <= 100
    again = mon(model, 0, 32)
    assert again["skill_mse"] == pytest.approx(row["skill_mse"])  # fixed images and masks: the same measurement
    # the mean predictor is what the monitor compares against: a model predicting it scores 1.0
    mean = mon._means[32]
    def mean_decoder(tokens):  # (B, P + N, C) -> (B, P + N, D): the mean target at every patch position
        prefix = mean.new_zeros(tokens.shape[1] - mean.shape[0], mean.shape[1])
        return torch.cat([prefix, mean]).unsqueeze(0).expand(tokens.shape[0], -1, -1)

    model.decoder.forward = mean_decoder
    assert mon(model, 0, 32)["skill_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert mean.shape == (4, model.target.out_dim(16))


def test_mean_target_averages_over_images():
    from fastmim_ds.targets import PixelTarget

    imgs = torch.randn(5, 3, 16, 16)
    mean = mean_target(PixelTarget(normalize=False), 8, [(imgs[:3], None), (imgs[3:], None)], torch.device("cpu"))
    assert torch.allclose(mean, PixelTarget(normalize=False)(imgs, 8).mean(0), atol=1e-6)


def test_cli_knn_of_an_initialisation(small_beton, tmp_path, capsys):
    cfg = tmp_path / "pre.yaml"
    cfg.write_text("model: {encoder_kwargs: {embed_dim: 32, depth: 1, num_heads: 1}, decoder_dim: 32}\n"
                   f"data: {{train: {small_beton / 'train.beton'}, val: {small_beton / 'val.beton'}, img_size: 32}}\n")
    out = tmp_path / "knn.json"
    assert cli(["knn", str(cfg), "--json", str(out), "--workers", "1"]) == 0
    assert "k-NN top-1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["knn_bank"] == 240 and result["knn_queries"] == 80 and result["img_size"] == 32
    assert cli(["knn", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_untrained_decoder_starts_near_the_mean_predictor(target, small_beton):
    """Regression: with xavier-initialised prediction layers the first HOG loss was ~65x the mean predictor's (the
    predictions had ~30x the target's variance) and tens of updates went into shrinking them."""
    from fastmim_ds.data.loaders import build_val_loader

    cfg = load_config(PretrainCfg, None, [*TINY, f"method.target={target}"])
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, 32)
    loader = build_val_loader(str(small_beton / "val.beton"), img_size=32, batch_size=64, crop_ratio=0.875,
                              num_workers=1, rank=0, world_size=1, device=torch.device("cpu"))
    images = next(iter(loader))[0].clone()
    with torch.no_grad():
        out = model(images)
    t, m = out["target"], out["mask"]
    mean_mse = ((t - t[m].mean(0)) ** 2)[m].mean().item()
    assert out["pred"].std().item() == 0.0  # a constant prediction
    assert out["loss"].item() < 1.6 * mean_mse, (out["loss"].item(), mean_mse)
    # and it learns from the first step: the zero weight gets a gradient
    model(images)["loss"].backward()
    assert model.decoder.pred.weight.grad.abs().sum() > 0


def test_skill_summary_reads_the_last_measured_epoch(tmp_path):
    from fastmim_ds.quality import skill_summary

    rows = [{"step": 1, "loss": 1.0},
            {"epoch_end": 0, "skill_mse": 0.06, "skill_mean_mse": 0.05, "skill_ratio": 1.2},
            {"epoch_end": 1, "skill_mse": 0.04, "skill_mean_mse": 0.05, "skill_ratio": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = skill_summary(tmp_path)
    assert "after epoch 2" in line and "ratio 0.800: better than" in line
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no reconstruction skill"):
        skill_summary(tmp_path)
